{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "orchestrator.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "orchestrator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.worker.fullname" -}}
{{- printf "%s-worker" (include "orchestrator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.workerMetrics.fullname" -}}
{{- printf "%s-worker-metrics" (include "orchestrator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.redis.fullname" -}}
{{- printf "%s-redis" (include "orchestrator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "orchestrator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The NATS subchart's full name, computed as its own "nats.fullname" helper does. */}}
{{- define "orchestrator.nats.fullname" -}}
{{- $nats := .Values.nats | default dict }}
{{- if $nats.fullnameOverride }}
{{- $nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" $nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "orchestrator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "orchestrator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orchestrator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: include "orchestrator.componentLabels" (list $ "worker") */}}
{{- define "orchestrator.componentLabels" -}}
{{ include "orchestrator.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "orchestrator.componentSelectorLabels" -}}
{{ include "orchestrator.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Images ------------------------------------------------------------------------------ */}}

{{/* include "orchestrator.image" (list $ .Values.worker.image) */}}
{{- define "orchestrator.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $registry := $root.Values.image.registry }}
{{- $ref := $image.repository }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end }}
{{- if $image.digest }}
{{- printf "%s@%s" $ref $image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "orchestrator.redis.image" -}}
{{- $image := .Values.redis.image }}
{{- $ref := $image.repository }}
{{- if $image.registry }}{{ $ref = printf "%s/%s" $image.registry $ref }}{{ end }}
{{- if $image.digest }}
{{- printf "%s@%s" $ref $image.digest }}
{{- else }}
{{- printf "%s:%s" $ref $image.tag }}
{{- end }}
{{- end }}

{{/* Connections ------------------------------------------------------------------------- */}}

{{/* NATS URL without credentials. */}}
{{- define "orchestrator.nats.baseUrl" -}}
{{- if .Values.nats.enabled }}
{{- $port := 4222 }}
{{- with .Values.nats.config }}{{ with .nats }}{{ with .port }}{{ $port = . }}{{ end }}{{ end }}{{ end }}
{{- printf "nats://%s:%v" (include "orchestrator.nats.fullname" .) $port }}
{{- else }}
{{- required "externalNats.url: set the URL of your NATS server (nats://host:4222), or nats.enabled=true to install NATS with this chart" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{/* NATS URL as the pods see it: the credentials are settings of their own (ORCH_NATS_USER,
ORCH_NATS_PASSWORD), never in the URL. */}}
{{- define "orchestrator.nats.url" -}}
{{- include "orchestrator.nats.baseUrl" . }}
{{- end }}

{{/* The chart's Redis servers in sentinel mode, as host names (`<pod>.<service>.<ns>.svc`). */}}
{{- define "orchestrator.redis.hosts" -}}
{{- $name := include "orchestrator.redis.fullname" . }}
{{- $hosts := list }}
{{- range $i := until (int .Values.redis.sentinel.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join " " $hosts }}
{{- end }}

{{- define "orchestrator.redis.baseUrl" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "sentinel") }}
{{- $sentinels := list }}
{{- range (splitList " " (include "orchestrator.redis.hosts" .)) }}
{{- $sentinels = append $sentinels (printf "%s:26379" .) }}
{{- end }}
{{- printf "redis+sentinel://%s/%s" (join "," $sentinels) .Values.redis.sentinel.masterName }}
{{- else if .Values.redis.enabled }}
{{- printf "redis://%s:6379" (include "orchestrator.redis.fullname" .) }}
{{- else }}
{{- required "externalRedis.url: set the URL of your Redis (redis://host:6379), or redis.enabled=true to run Redis with this chart" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* Redis URL as the pods see it: without credentials (ORCH_REDIS_USERNAME and
ORCH_REDIS_PASSWORD carry them). */}}
{{- define "orchestrator.redis.url" -}}
{{- include "orchestrator.redis.baseUrl" . }}
{{- end }}

{{/*
Environment shared by the coordinator and the workers: the URLs, and the credentials from their
Secrets as the services' own settings (so any value works, URL-safe or not).
*/}}
{{- define "orchestrator.connectionEnv" -}}
{{- with .Values.natsAuth.existingSecret }}
- name: ORCH_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.natsAuth.usernameKey }}
- name: ORCH_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.natsAuth.passwordKey }}
{{- end }}
{{- with .Values.redisAuth.existingSecret }}
{{- if $.Values.redisAuth.usernameKey }}
- name: ORCH_REDIS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redisAuth.usernameKey }}
{{- end }}
- name: ORCH_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redisAuth.passwordKey }}
{{- end }}
- name: ORCH_NATS_URL
  value: {{ include "orchestrator.nats.url" . | quote }}
{{- if .Values.natsTls.caSecret }}
- name: ORCH_NATS_CA_FILE
  value: /etc/orch/nats-tls/ca.crt
{{- end }}
{{- if .Values.natsTls.required }}
- name: ORCH_NATS_TLS_REQUIRED
  value: "true"
{{- end }}
- name: ORCH_REDIS_URL
  value: {{ include "orchestrator.redis.url" . | quote }}
{{- end }}

{{/* The NATS CA bundle's volume mount and volume (natsTls.caSecret), in both deployments. */}}
{{- define "orchestrator.natsTlsMount" -}}
{{- if .Values.natsTls.caSecret }}
- name: nats-tls
  mountPath: /etc/orch/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "orchestrator.natsTlsVolume" -}}
{{- with .Values.natsTls.caSecret }}
- name: nats-tls
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $.Values.natsTls.caKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{/* Scheduling ------------------------------------------------------------------------- */}}

{{/* include "orchestrator.affinity" (list $ "worker" .Values.worker) */}}
{{- define "orchestrator.affinity" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $values := index . 2 }}
{{- if $values.affinity }}
affinity:
  {{- toYaml $values.affinity | nindent 2 }}
{{- else if eq $values.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "orchestrator.componentSelectorLabels" (list $root $component) | nindent 14 }}
{{- else if eq $values.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "orchestrator.componentSelectorLabels" (list $root $component) | nindent 12 }}
{{- end }}
{{- end }}

{{/* Security --------------------------------------------------------------------------- */}}

{{/* uid/gid 65532 is the `nonroot` user of the images (distroless and the claude-code variant). */}}
{{- define "orchestrator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "orchestrator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* Checks ----------------------------------------------------------------------------- */}}

{{/* Cross-field rules the schema cannot state with a readable message. */}}
{{- define "orchestrator.validate" -}}
{{- if and (not .Values.auth.noAuth) (not .Values.auth.existingSecret) }}
{{- fail "auth.existingSecret: name the Secret holding the API tokens (kubectl create secret generic orchestrator-auth --from-literal=tokens=...), or set auth.noAuth=true for a throwaway cluster" }}
{{- end }}
{{- if and (eq .Values.autoscaling.mode "hpa") (lt (int .Values.autoscaling.minReplicas) 1) }}
{{- fail "autoscaling.minReplicas: an HPA needs at least 1 (only keda can scale to 0)" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%v) must not exceed autoscaling.maxReplicas (%v)" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- if and (eq .Values.autoscaling.mode "keda") (not .Values.nats.enabled) (not .Values.autoscaling.keda.natsServerMonitoringEndpoint) }}
{{- fail "autoscaling.keda.natsServerMonitoringEndpoint: with an external NATS, set the host:port of its monitoring endpoint (e.g. nats-headless.nats.svc.cluster.local:8222)" }}
{{- end }}
{{- if contains "@" .Values.externalNats.url }}
{{- fail "externalNats.url: must not contain credentials (user:password@); put them in a Secret and name it in natsAuth.existingSecret" }}
{{- end }}
{{- if contains "@" .Values.externalRedis.url }}
{{- fail "externalRedis.url: must not contain credentials (:password@); put them in a Secret and name it in redisAuth.existingSecret" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.externalNats.url }}
{{- fail "externalNats.url is set but nats.enabled=true also installs NATS: set nats.enabled=false to use the external server" }}
{{- end }}
{{- $servers := int (include "orchestrator.natsServers" .) }}
{{- if and (gt $servers 0) (gt (int .Values.coordinator.streamReplicas) $servers) }}
{{- fail (printf "coordinator.streamReplicas (%v) must not exceed the NATS servers of the chart's cluster (nats.config.cluster.replicas: %v): JetStream cannot place more replicas than servers" .Values.coordinator.streamReplicas $servers) }}
{{- end }}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "sentinel") (gt (int .Values.redis.sentinel.quorum) (int .Values.redis.sentinel.replicas)) }}
{{- fail (printf "redis.sentinel.quorum (%v) must not exceed redis.sentinel.replicas (%v): no failover could ever be agreed" .Values.redis.sentinel.quorum .Values.redis.sentinel.replicas) }}
{{- end }}
{{- if and .Values.redis.enabled .Values.externalRedis.url }}
{{- fail "externalRedis.url is set but redis.enabled=true also runs Redis: set redis.enabled=false to use the external server" }}
{{- end }}
{{- end }}

{{/* The NATS servers of the in-chart cluster (1 without a cluster; 0 for an external NATS). */}}
{{- define "orchestrator.natsServers" -}}
{{- if not .Values.nats.enabled }}0
{{- else if and .Values.nats.config.cluster .Values.nats.config.cluster.enabled }}{{ int .Values.nats.config.cluster.replicas }}
{{- else }}1
{{- end }}
{{- end }}

{{/* JetStream replicas of the coordinator's streams: given, or the in-chart cluster's size. */}}
{{- define "orchestrator.streamReplicas" -}}
{{- $given := int .Values.coordinator.streamReplicas }}
{{- $servers := int (include "orchestrator.natsServers" .) }}
{{- if gt $given 0 }}{{ $given }}
{{- else if gt $servers 0 }}{{ min $servers 5 }}
{{- else }}1
{{- end }}
{{- end }}

{{/* The KEDA monitoring endpoint: given, or the NATS chart's headless service. */}}
{{- define "orchestrator.keda.monitoringEndpoint" -}}
{{- if .Values.autoscaling.keda.natsServerMonitoringEndpoint }}
{{- .Values.autoscaling.keda.natsServerMonitoringEndpoint }}
{{- else }}
{{- $port := 8222 }}
{{- with .Values.nats.config }}{{ with .monitor }}{{ with .port }}{{ $port = . }}{{ end }}{{ end }}{{ end }}
{{- printf "%s-headless.%s.svc.%s:%v" (include "orchestrator.nats.fullname" .) .Release.Namespace .Values.clusterDomain $port }}
{{- end }}
{{- end }}

{{/* Prometheus label matchers of the scraped services. */}}
{{- define "orchestrator.promCoordinator" -}}
namespace="{{ .Release.Namespace }}",service="{{ include "orchestrator.coordinator.fullname" . }}"
{{- end }}

{{- define "orchestrator.promWorker" -}}
namespace="{{ .Release.Namespace }}",service="{{ include "orchestrator.workerMetrics.fullname" . }}"
{{- end }}

{{/* redis.conf of the chart's Redis. */}}
{{- define "orchestrator.redis.conf" -}}
bind * -::*
port 6379
dir /data
# The append-only file alone keeps the data (as `orchctl local up` runs Redis).
save ""
appendonly yes
appendfsync {{ .Values.redis.appendfsync }}
# Task records and idempotency keys must never be evicted.
maxmemory-policy noeviction
{{- with .Values.redis.maxmemory }}
maxmemory {{ . }}
{{- end }}
{{- if not .Values.redisAuth.existingSecret }}
# No password (redisAuth.existingSecret is empty): reachable only inside the cluster.
protected-mode no
{{- end }}
{{- end }}
