#!/usr/bin/env python3
"""Offline tests of the Helm chart, the images' Dockerfile and the monitoring files.

Run by scripts/helm-check, which provides the pinned tools:

    python3 tests-helm/test_chart.py --helm PATH/helm --hadolint PATH/hadolint

The chart is rendered with `helm template` for several values combinations; every manifest is
validated against the Kubernetes 1.35 schemas (kubernetes-validate, strict) and yamllint, CRDs
(ServiceMonitor, PrometheusRule, ScaledObject) are checked structurally, and the manifests are
checked for what the product needs (probes, drain grace, metrics ports, secrets only by
reference, non-root read-only pods). Values the schema must reject are tried one by one. When the
orchestrator binaries are built (target/release or target/debug, or --bin-dir), each one is
started with the environment the chart gives it, to prove that they accept it.

`helm dependency build` needs the network, so the NATS subchart is replaced by an empty
stand-in chart of the same name and version in a temporary copy of the chart (--nats-chart DIR
uses a real unpacked NATS chart instead). Plain asserts; the last line is `N passed, M failed`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "orchestrator"
KUBE_VERSION = "1.35.0"
NAMESPACE = "orch"
RELEASE = "r"

# Metric names the binaries export (coordinator, worker). Dashboards may query only these.
APP_METRICS = {
    "orch_tasks_submitted_total", "orch_tasks_finished_total", "orch_jobs_dispatched_total",
    "orch_jobs_finished_total", "orch_job_duration_seconds", "orch_dispatch_latency_seconds",
    "orch_tokens_total", "orch_cost_usd_total", "orch_http_errors_total",
    "orch_worker_jobs_started_total", "orch_worker_jobs_finished_total",
    "orch_worker_jobs_redelivered_total", "orch_worker_jobs_handed_back_total",
    "orch_worker_slots_busy", "orch_worker_slots_total", "orch_coordinator_leader",
    "orch_worker_credential_exhausted_total", "orch_worker_jobs_parked_total",
}
# Prometheus histograms: exported only as _bucket, _sum and _count series (no base name, no
# quantile label), so quantiles come from histogram_quantile over buckets.
HISTOGRAMS = {"orch_job_duration_seconds", "orch_dispatch_latency_seconds"}
# Alerts may also use Prometheus' own `up` and the NATS exporter's consumer series.
ALERT_EXTRA_METRICS = {"up", "jetstream_consumer_num_pending", "jetstream_consumer_num_redelivered"}

CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "PodMonitor"}
SECRET_NAME_RE = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL)", re.I)
POD_KINDS = {"Deployment", "StatefulSet", "Pod"}

EXTERNAL = [
    "--set", "nats.enabled=false",
    "--set", "externalNats.url=nats://nats.messaging.svc:4222",
    "--set", "redis.enabled=false",
    "--set", "externalRedis.url=redis://redis.data.svc:6379/0",
    "--set", "natsAuth.existingSecret=nats-creds",
    "--set", "natsTls.caSecret=nats-ca",
    "--set", "redisAuth.existingSecret=redis-creds",
    "--set", "redisAuth.usernameKey=username",
]
MONITORING = [
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.serviceMonitor.labels.release=kube-prometheus-stack",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "monitoring.prometheusRule.natsExporter=true",
    "--set", "monitoring.prometheusRule.monthlyBudgetUsd=1000",
    "--set", "monitoring.grafanaDashboard.enabled=true",
    "--set", "coordinator.ingress.enabled=true",
    "--set", "providers.existingSecret=orchestrator-providers",
    "--set", "networkPolicy.enabled=true",
    "--set", "redisAuth.existingSecret=redis-creds",
]
COMBOS: dict[str, list[str]] = {
    "defaults": [],
    "external": EXTERNAL,
    "keda": ["--set", "autoscaling.mode=keda", "--set", "autoscaling.minReplicas=0"],
    "keda-external": EXTERNAL + [
        "--set", "autoscaling.mode=keda",
        "--set", "autoscaling.keda.natsServerMonitoringEndpoint=nats-headless.messaging.svc.cluster.local:8222",
    ],
    "hpa": ["--set", "autoscaling.mode=hpa", "--set", "autoscaling.minReplicas=2"],
    "monitoring": MONITORING,
    "monitoring-keda0": MONITORING + ["--set", "autoscaling.mode=keda", "--set", "autoscaling.minReplicas=0"],
    "noauth": ["--set", "auth.noAuth=true", "--set", "auth.existingSecret="],
    "dev": ["-f", str(CHART / "values-dev.yaml")],
    "credentials": [
        "--set", "providers.existingSecret=orchestrator-providers",
        "--set-json", 'providers.credentials=[{"backend":"anthropic","name":"team-a","secretKey":"ANTHROPIC_KEY_A"},'
                      '{"backend":"anthropic","name":"team-b","secretKey":"ANTHROPIC_KEY_B"}]',
    ],
    "prod": ["-f", str(CHART / "values-prod.yaml")],
    "redis-ha": ["--set", "redis.mode=sentinel", "--set", "networkPolicy.enabled=true",
                 "--set", "redisAuth.existingSecret=redis-creds"],
}

# Values the chart must refuse, with words the error must contain.
REJECTED: list[tuple[str, list[str], list[str]]] = [
    ("worker.slots=0", ["--set", "worker.slots=0"], ["/worker/slots", "minimum"]),
    ("worker.slots=\"four\"", ["--set-string", "worker.slots=four"], ["/worker/slots", "integer"]),
    ("worker.slots=10001", ["--set", "worker.slots=10001"], ["/worker/slots", "maximum"]),
    ("autoscaling.mode=magic", ["--set", "autoscaling.mode=magic"], ["/autoscaling/mode", "none", "hpa", "keda"]),
    ("coordinator.replicas=0", ["--set", "coordinator.replicas=0"], ["/coordinator/replicas", "minimum"]),
    ("worker.drainGraceSeconds=0", ["--set", "worker.drainGraceSeconds=0"], ["/worker/drainGraceSeconds"]),
    ("coordinator.jobAckWait=soon", ["--set", "coordinator.jobAckWait=soon"], ["/coordinator/jobAckWait"]),
    ("a token in clear (auth.token)", ["--set", "auth.token=0123456789abcdef0123"], ["/auth", "token"]),
    ("an API key in clear (providers.anthropicApiKey)", ["--set", "providers.anthropicApiKey=sk-ant-x"],
     ["/providers", "anthropicApiKey"]),
    ("credentials in externalNats.url",
     ["--set", "nats.enabled=false", "--set", "externalNats.url=nats://orch:secret@nats:4222"],
     ["externalNats.url", "credentials", "natsAuth.existingSecret"]),
    ("credentials in externalRedis.url",
     ["--set", "redis.enabled=false", "--set", "externalRedis.url=redis://:secret@redis:6379"],
     ["externalRedis.url", "credentials", "redisAuth.existingSecret"]),
    ("externalRedis.url that is not redis:// or rediss://",
     ["--set", "redis.enabled=false", "--set", "externalRedis.url=http://redis:6380"], ["/externalRedis/url"]),
    ("streamReplicas above the in-chart NATS cluster",
     ["-f", str(CHART / "values-prod.yaml"), "--set", "coordinator.streamReplicas=4"],
     ["coordinator.streamReplicas", "nats.config.cluster.replicas"]),
    ("streamReplicas above JetStream's 5", ["--set", "coordinator.streamReplicas=7"],
     ["/coordinator/streamReplicas", "maximum"]),
    ("a Sentinel quorum above the Sentinels",
     ["--set", "redis.mode=sentinel", "--set", "redis.sentinel.quorum=4"],
     ["redis.sentinel.quorum", "redis.sentinel.replicas"]),
    ("fewer than 3 Redis servers in sentinel mode",
     ["--set", "redis.mode=sentinel", "--set", "redis.sentinel.replicas=2"], ["/redis/sentinel/replicas", "minimum"]),
    ("a typo (worker.slot)", ["--set", "worker.slot=4"], ["/worker", "slot"]),
    ("bad image digest", ["--set", "worker.image.digest=latest"], ["/worker/image/digest"]),
    ("external NATS without a URL", ["--set", "nats.enabled=false"], ["externalNats.url"]),
    ("external Redis without a URL", ["--set", "redis.enabled=false"], ["externalRedis.url"]),
    ("externalNats.url while nats.enabled",
     ["--set", "externalNats.url=nats://nats:4222"], ["externalNats.url", "nats.enabled=false"]),
    ("no token Secret without noAuth", ["--set", "auth.existingSecret="], ["auth.existingSecret"]),
    ("hpa with minReplicas 0", ["--set", "autoscaling.mode=hpa", "--set", "autoscaling.minReplicas=0"],
     ["autoscaling.minReplicas"]),
    ("minReplicas above maxReplicas", ["--set", "autoscaling.minReplicas=5", "--set", "autoscaling.maxReplicas=2"],
     ["autoscaling.minReplicas", "maxReplicas"]),
    ("keda on external NATS without a monitoring endpoint",
     EXTERNAL + ["--set", "autoscaling.mode=keda"], ["natsServerMonitoringEndpoint"]),
]


# --- test registry --------------------------------------------------------------------------

class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    @staticmethod
    def _call(fn, *args) -> str | None:
        """None when the test passed, else why it failed."""
        try:
            fn(*args)
        except AssertionError as e:
            return str(e)
        except Exception:  # a crash in a test is a failure of that test, not of the run
            return f"unexpected error\n{traceback.format_exc()}"
        return None

    def _report(self, name: str, failure: str | None) -> None:
        if failure is None:
            self.passed += 1
            print(f"ok   {name}")
        else:
            self.failed.append(name)
            print(f"FAIL {name}: {failure}")

    def run(self, name: str, fn, *args) -> None:
        self._report(name, self._call(fn, *args))

    def run_parallel(self, tests: list[tuple]) -> None:
        """Tests that mostly wait (processes), run at once and reported in order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(tests))) as pool:
            futures = [(name, pool.submit(self._call, fn, *args)) for name, fn, *args in tests]
            for name, future in futures:
                self._report(name, future.result())


# --- helm -----------------------------------------------------------------------------------

class Helm:
    def __init__(self, binary: str, chart: Path, home: Path) -> None:
        self.binary = binary
        self.chart = chart
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=120)

    def template(self, extra: list[str]) -> subprocess.CompletedProcess:
        return self.run("template", RELEASE, str(self.chart), "--namespace", NAMESPACE,
                        "--kube-version", KUBE_VERSION, *extra)

    def notes(self, extra: list[str]) -> str:
        out = self.run("install", RELEASE, str(self.chart), "--namespace", NAMESPACE, "--dry-run=client", *extra)
        assert out.returncode == 0, f"helm install --dry-run failed:\n{out.stderr}"
        assert "NOTES:" in out.stdout, "no NOTES in the dry-run output"
        return out.stdout.split("NOTES:", 1)[1]


def offline_chart(dest: Path, nats_chart: Path | None) -> Path:
    """A copy of the chart whose NATS dependency is present without the network."""
    chart = dest / "orchestrator"
    shutil.copytree(CHART, chart)
    deps = yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]
    nats = next(d for d in deps if d["name"] == "nats")
    target = chart / "charts" / "nats"
    if nats_chart:
        shutil.copytree(nats_chart, target)
    else:
        target.mkdir(parents=True)
        (target / "Chart.yaml").write_text(
            "apiVersion: v2\nname: nats\n"
            f"version: {nats['version']}\n"
            "description: Offline stand-in for the official NATS chart (renders nothing)\n")
    return chart


def parse_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# --- kubernetes-validate ---------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def k8s_validator():
    import kubernetes_validate
    import kubernetes_validate.utils as kvu

    # validate() re-reads the multi-megabyte definitions file for every object; cache the files.
    kvu.schema_contents = functools.lru_cache(maxsize=None)(kvu.schema_contents)
    return kubernetes_validate


def validate_k8s(doc: dict) -> None:
    kv = k8s_validator()
    try:
        kv.validate(doc, KUBE_VERSION, strict=True)
    except kv.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}") from None
    except kv.SchemaNotFoundError as e:
        raise AssertionError(e.message) from None


# --- manifest helpers ------------------------------------------------------------------------

def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def container(doc: dict, name: str) -> dict:
    cs = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    assert cs, f"{doc['kind']}/{doc['metadata']['name']} has no container {name}"
    return cs[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def port_number(c: dict, name: str) -> int:
    for p in c.get("ports", []):
        if p.get("name") == name:
            return p["containerPort"]
    raise AssertionError(f"container {c['name']} has no port named {name}")


def chart_values(extra: list[str]) -> dict:
    """The values of a combination as helm computes them: defaults, -f files, then --set."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for flag, arg in zip(extra, extra[1:]):
        if flag == "-f":
            deep_merge(values, yaml.safe_load(Path(arg).read_text()))
        elif flag in ("--set", "--set-string"):
            key, raw = arg.split("=", 1)
            value = raw if flag == "--set-string" else yaml.safe_load(raw) if raw else ""
            node = values
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    return values


def deep_merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v


# --- checks of one rendered combination ------------------------------------------------------

def check_kubernetes_schemas(docs: list[dict]) -> None:
    checked = 0
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        validate_k8s(d)
        checked += 1
    assert checked > 0, "nothing validated"


def check_coordinator_probes(docs: list[dict]) -> None:
    c = container(one(docs, "Deployment", "coordinator"), "coordinator")
    http = port_number(c, "http")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        p = c.get(probe)
        assert p and "httpGet" in p, f"coordinator has no HTTP {probe}"
        assert p["httpGet"]["path"] == path, f"coordinator {probe} checks {p['httpGet']['path']}, want {path}"
        assert p["httpGet"]["port"] in ("http", http), f"coordinator {probe} is not on the API port"
    listen = env_of(c)["ORCH_LISTEN"]["value"]
    assert listen.endswith(f":{http}"), f"ORCH_LISTEN {listen} is not the container port {http}"
    assert listen.startswith("0.0.0.0:"), f"ORCH_LISTEN {listen} is not reachable from outside the pod"


def check_worker_probes_and_drain(docs: list[dict], values: dict) -> None:
    d = one(docs, "Deployment", "worker")
    c = container(d, "worker")
    metrics = port_number(c, "metrics")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(probe)
        assert p and p.get("httpGet", {}).get("path") == "/healthz", f"worker {probe} does not check /healthz"
        assert p["httpGet"]["port"] in ("metrics", metrics), f"worker {probe} is not on the metrics port"
    env = env_of(c)
    assert env["ORCH_WORKER_LISTEN"]["value"] == f"0.0.0.0:{metrics}", "ORCH_WORKER_LISTEN does not match the port"
    assert env["ORCH_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", \
        "the worker id is not the pod name"
    grace_env = env["ORCH_DRAIN_GRACE"]["value"]
    m = re.fullmatch(r"(\d+)s", grace_env)
    assert m, f"ORCH_DRAIN_GRACE {grace_env!r} is not whole seconds"
    drain = int(m.group(1))
    assert drain == values["worker"]["drainGraceSeconds"], "ORCH_DRAIN_GRACE is not worker.drainGraceSeconds"
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pre_stop == values["worker"]["preStopSleepSeconds"], "preStop sleep is not worker.preStopSleepSeconds"
    if pre_stop == 0:
        assert "lifecycle" not in c, "a zero preStop sleep is invalid before Kubernetes 1.33"
    grace = pod_spec(d)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 5, \
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop}s + drain grace {drain}s + 5s margin"
    assert env["ORCH_SLOTS"]["value"] == str(values["worker"]["slots"]), "ORCH_SLOTS is not worker.slots"


def check_metrics_ports(docs: list[dict]) -> None:
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    coord = services[f"{RELEASE}-orchestrator-coordinator"]
    assert any(p["name"] == "http" for p in coord["spec"]["ports"]), "coordinator Service has no http port"
    wm = services[f"{RELEASE}-orchestrator-worker-metrics"]
    assert [p["name"] for p in wm["spec"]["ports"]] == ["metrics"], "worker metrics Service must expose only metrics"
    assert wm["spec"].get("clusterIP") == "None", "worker metrics Service should be headless"


def iter_pods(docs: list[dict]):
    for d in docs:
        if d["kind"] in POD_KINDS:
            yield d, pod_spec(d)


def check_secrets_by_reference(docs: list[dict]) -> None:
    assert not by_kind(docs, "Secret"), "the chart must not create Secrets (credentials come from existing ones)"
    for d, spec in iter_pods(docs):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            where = f"{d['kind']}/{d['metadata']['name']}/{c['name']}"
            for e in c.get("env", []):
                if SECRET_NAME_RE.search(e["name"]):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and ref.get("name") and ref.get("key"), \
                        f"{where}: {e['name']} is not read from a Secret (secretKeyRef)"
                    assert "value" not in e, f"{where}: {e['name']} has an inline value"
                value = e.get("value", "")
                for m in re.finditer(r"://([^@/\s]*)@", value):
                    userinfo = m.group(1)
                    for part in filter(None, userinfo.split(":")):
                        assert re.fullmatch(r"\$\([A-Z_]+\)", part), \
                            f"{where}: {e['name']} carries a literal credential in its URL"
                for ref in re.findall(r"\$\(([A-Z_]+)\)", value):
                    names = [x["name"] for x in c["env"]]
                    assert ref in names[: names.index(e["name"])], \
                        f"{where}: {e['name']} uses $({ref}) which is not defined before it"
            for ef in c.get("envFrom", []):
                assert "secretRef" in ef or "configMapRef" in ef, f"{where}: unexpected envFrom"


def check_security_context(docs: list[dict]) -> None:
    # The chart's own pods; the NATS subchart keeps its upstream defaults (helm/README.md).
    for d, spec in iter_pods(docs):
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "orchestrator":
            continue
        name = f"{d['kind']}/{d['metadata']['name']}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{name}: pod securityContext.runAsNonRoot is not true"
        assert psc.get("runAsUser", 0) != 0, f"{name}: pod runs as uid 0"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: no RuntimeDefault seccomp"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: mounts a service account token"
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            assert csc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: root filesystem is writable"
            assert csc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: privilege escalation allowed"
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: capabilities not dropped"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] in ("coordinator", "worker"):
                assert "/tmp" in mounts, f"{name}/{c['name']}: /tmp is not writable (no emptyDir)"
            if c["name"] == "worker":
                assert "/home/nonroot" in mounts, f"{name}: $HOME is not writable (claude-code needs it)"


def check_selectors(docs: list[dict]) -> None:
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for d in pods.values():
        sel = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items(), f"{d['metadata']['name']}: selector does not match its pods"
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in pods.values()]
    for s in by_kind(docs, "Service"):
        sel = s["spec"]["selector"]
        assert any(sel.items() <= t.items() for t in templates), f"Service {s['metadata']['name']} selects no pods"
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= t.items() for t in templates), f"PDB {pdb['metadata']['name']} selects no pods"
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for a in by_kind(docs, kind):
            target = a["spec"]["scaleTargetRef"]["name"]
            assert target in pods and pods[target]["kind"] == "Deployment", f"{kind} targets unknown {target}"


def check_crds(docs: list[dict], values: dict) -> None:
    kinds = {d["kind"] for d in docs}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion"
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if sel.items() <= s["metadata"]["labels"].items()]
        assert matched, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert ep["path"] == "/metrics", "ServiceMonitor does not scrape /metrics"
            for s in matched:
                assert any(p["name"] == ep["port"] for p in s["spec"]["ports"]), \
                    f"ServiceMonitor port {ep['port']} is not a port of Service {s['metadata']['name']}"
    for so in by_kind(docs, "ScaledObject"):
        assert so["apiVersion"] == "keda.sh/v1alpha1", "ScaledObject apiVersion"
        triggers = so["spec"]["triggers"]
        # One trigger per job consumer: every backend's and the pre-routing one.
        assert {t["metadata"]["consumer"] for t in triggers} == {
            "workers-sim", "workers-claude-code", "workers-anthropic", "workers-openai",
            "workers-command", "workers"}, "KEDA watches the wrong consumers"
        for trigger in triggers:
            assert trigger["type"] == "nats-jetstream", "ScaledObject trigger type"
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
            assert meta["stream"] == "ORCH_JOBS", "KEDA watches the wrong stream"
            assert re.fullmatch(r"[^/:]+:\d+", meta["natsServerMonitoringEndpoint"]), "monitoring endpoint is not host:port"
            assert int(meta["lagThreshold"]) >= 1, "lagThreshold must be at least 1"
        assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"], "min above max"
        assert "HorizontalPodAutoscaler" not in kinds, "KEDA and an HPA would fight over the replicas"
        assert "replicas" not in one(docs, "Deployment", "worker")["spec"], \
            "with an autoscaler the worker Deployment must not set replicas"
    for pr in by_kind(docs, "PrometheusRule"):
        assert pr["apiVersion"] == "monitoring.coreos.com/v1", "PrometheusRule apiVersion"
        check_rules(pr, values)


def check_rules(pr: dict, values: dict) -> None:
    alerts = {}
    for group in pr["spec"]["groups"]:
        assert group["name"] and group["rules"], "empty rule group"
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, f"unexpected keys in {rule}"
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), "severity label"
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], "annotations"
            alerts[rule["alert"]] = rule["expr"]
    prom = values["monitoring"]["prometheusRule"]
    expected = {"OrchestratorCoordinatorDown", "OrchestratorNoLeader", "OrchestratorWorkersSaturated", "OrchestratorDispatchLatencyHigh",
                "OrchestratorJobFailureRateHigh", "OrchestratorJobsRedelivered", "OrchestratorCredentialsExhausted"}
    scale_to_zero = values["autoscaling"]["mode"] == "keda" and values["autoscaling"]["minReplicas"] == 0
    if prom["natsExporter"] or not scale_to_zero:
        expected.add("OrchestratorNoReadyWorkers")
    if prom["natsExporter"]:
        expected |= {"OrchestratorQueueBacklogGrowing", "OrchestratorJobsStuckInRedelivery"}
    if prom["monthlyBudgetUsd"] > 0:
        expected.add("OrchestratorBudgetNearlySpent")
    assert set(alerts) == expected, f"alerts {sorted(alerts)} != expected {sorted(expected)}"
    for name, expr in alerts.items():
        check_promql(name, expr, APP_METRICS | ALERT_EXTRA_METRICS)
        assert "{{" not in expr and "}}" not in expr, f"{name}: unrendered template in expr"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{name}: unbalanced"


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "delta", "deriv", "absent", "vector", "by",
    "without", "on", "and", "or", "unless", "histogram_quantile", "le", "bool", "ignoring", "group_left",
    "humanizePercentage", "humanizeDuration",
}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are metric names (not labels, functions or keywords)."""
    expr = re.sub(r'"[^"]*"', '""', expr)           # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)         # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)        # ranges
    expr = re.sub(r"(by|without|on|ignoring)\s*\([^)]*\)", r"\1()", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d.*", n)}


def check_promql(where: str, expr: str, allowed: set[str]) -> None:
    assert "quantile=" not in expr, \
        f"{where}: the binaries export histograms, not summaries (no quantile label)"
    for name in metric_names(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in HISTOGRAMS:
            raise AssertionError(f"{where}: {name} is a histogram: query its _bucket, _sum or _count")
        if base != name and base in HISTOGRAMS:
            continue
        assert name in allowed, f"{where}: queries {name}, which nothing exports"
    if "histogram_quantile" in expr:
        assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), \
            f"{where}: histogram_quantile needs _bucket series summed by le"


def check_yamllint(text: str, config: Path) -> None:
    from yamllint import config as ylconfig
    from yamllint import linter

    conf = ylconfig.YamlLintConfig(file=str(config))
    problems = [p for p in linter.run(text, conf) if p.level == "error"]
    assert not problems, "yamllint: " + "; ".join(f"line {p.line}: {p.desc} ({p.rule})" for p in problems[:10])


def check_combo_specifics(name: str, docs: list[dict], values: dict) -> None:
    kinds = [d["kind"] for d in docs]
    worker = one(docs, "Deployment", "worker")
    coord = one(docs, "Deployment", "coordinator")
    cenv = env_of(container(coord, "coordinator"))
    wenv = env_of(container(worker, "worker"))
    assert cenv["ORCH_NATS_URL"]["value"] == wenv["ORCH_NATS_URL"]["value"], "coordinator and workers use different NATS"
    assert cenv["ORCH_REDIS_URL"]["value"] == wenv["ORCH_REDIS_URL"]["value"], "coordinator and workers use different Redis"
    assert coord["spec"]["replicas"] == values["coordinator"]["replicas"] == 2, "coordinator replicas default to 2 (leader + standby)"
    assert coord["spec"]["strategy"]["type"] == "RollingUpdate", "standbys forward writes: replicas may overlap during an update"
    nats_url = cenv["ORCH_NATS_URL"]["value"]
    redis_url = cenv["ORCH_REDIS_URL"]["value"]
    if name in ("defaults", "keda", "hpa", "dev"):
        assert nats_url == f"nats://{RELEASE}-nats:4222", f"bundled NATS URL is {nats_url}"
        assert redis_url == f"redis://{RELEASE}-orchestrator-redis:6379", f"bundled Redis URL is {redis_url}"
        assert "StatefulSet" in kinds, "the chart's Redis is missing"
    if name.startswith("external") or name == "keda-external":
        assert nats_url == "nats://nats.messaging.svc:4222", nats_url
        assert redis_url == "redis://redis.data.svc:6379/0", redis_url
        for env in (cenv, wenv):
            assert env["ORCH_NATS_USER"]["valueFrom"]["secretKeyRef"]["name"] == "nats-creds", env
            assert env["ORCH_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "nats-creds", env
            assert env["ORCH_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "redis-creds", env
            assert env["ORCH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-creds", env
        assert "StatefulSet" not in kinds, "external Redis, but the chart still runs one"
        for dep, env in ((coord, cenv), (worker, wenv)):
            assert env["ORCH_NATS_CA_FILE"]["value"] == "/etc/orch/nats-tls/ca.crt", env.get("ORCH_NATS_CA_FILE")
            spec = pod_spec(dep)
            vol = next(v for v in spec["volumes"] if v["name"] == "nats-tls")
            assert vol["secret"]["secretName"] == "nats-ca", vol
            mounts = spec["containers"][0]["volumeMounts"]
            assert {"name": "nats-tls", "mountPath": "/etc/orch/nats-tls", "readOnly": True} in mounts, mounts
    else:
        assert "ORCH_NATS_CA_FILE" not in cenv, "a NATS CA without natsTls.caSecret"
    replicas = cenv["ORCH_STREAM_REPLICAS"]["value"]
    if name == "prod":
        assert replicas == "3", f"prod streams on a 3-server NATS must have 3 replicas, not {replicas}"
    if name.startswith("external"):
        assert replicas == "1", f"an external NATS's size is unknown: 1 replica unless set, not {replicas}"
    if name == "prod":
        assert nats_url == f"nats://{RELEASE}-nats:4222", nats_url
        host = f"{RELEASE}-orchestrator-redis"
        sentinels = ",".join(f"{host}-{i}.{host}.{NAMESPACE}.svc:26379" for i in range(3))
        assert redis_url == f"redis+sentinel://{sentinels}/orch", f"prod Redis is not highly available: {redis_url}"
        assert "ORCH_NATS_PASSWORD" in cenv and "ORCH_REDIS_PASSWORD" in wenv, "prod credentials are not set"
        assert "ORCH_REDIS_USERNAME" not in cenv, "prod Redis uses its default user"
        aff = pod_spec(worker)["affinity"]["podAntiAffinity"]
        assert aff["preferredDuringSchedulingIgnoredDuringExecution"], "prod workers are not spread over nodes"
        assert one(docs, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"], "prod Redis has no volume"
        assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 600, "prod drain grace is not applied"
        for n in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_BASE_URL"):
            ref = wenv[n]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "orchestrator-providers" and ref.get("optional") is True, f"{n} reference"
    if name == "redis-ha":
        sts = one(docs, "StatefulSet", "redis")
        assert sts["spec"]["replicas"] == 3, "sentinel mode runs a primary and 2 replicas"
        names = [c["name"] for c in pod_spec(sts)["containers"]]
        assert names == ["redis", "sentinel"], f"each Redis server needs a Sentinel beside it: {names}"
        svc = one(docs, "Service", "redis")
        assert svc["spec"].get("publishNotReadyAddresses") is True, "servers must resolve each other before ready"
        assert {p["name"] for p in svc["spec"]["ports"]} == {"redis", "sentinel"}, svc["spec"]["ports"]
        host = f"{RELEASE}-orchestrator-redis"
        sentinels = ",".join(f"{host}-{i}.{host}.{NAMESPACE}.svc:26379" for i in range(3))
        assert redis_url == f"redis+sentinel://{sentinels}/orch", redis_url
        script = container(sts, "sentinel")["command"][-1]
        assert "sentinel monitor orch" in script and "auth-pass" in script, script
        assert "masterauth" in container(sts, "redis")["command"][-1], "replicas cannot authenticate to the primary"
        policy = one(docs, "NetworkPolicy", "redis")
        ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert ports == {"redis", "sentinel"}, ports
    if name == "dev":
        assert worker["spec"]["replicas"] == 1, "dev runs one worker"
        sts = one(docs, "StatefulSet", "redis")
        assert "volumeClaimTemplates" not in sts["spec"], "dev Redis should not claim a volume"
    if name == "hpa":
        (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
        metric = hpa["spec"]["metrics"][0]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "orch_worker_busy_slot_ratio"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, "scale-down too eager"
        assert "replicas" not in worker["spec"], "with an HPA the worker Deployment must not set replicas"
    if name == "keda":
        (so,) = by_kind(docs, "ScaledObject")
        meta = so["spec"]["triggers"][0]["metadata"]
        assert meta["natsServerMonitoringEndpoint"] == f"{RELEASE}-nats-headless.{NAMESPACE}.svc.cluster.local:8222"
        assert meta["lagThreshold"] == str(values["worker"]["slots"]), "lagThreshold defaults to worker.slots"
        assert so["spec"]["minReplicaCount"] == 0
    if name == "noauth":
        assert "ORCH_TOKEN" not in cenv and cenv["ORCH_NO_AUTH"]["value"] == "true"
    if name != "noauth":
        ref = cenv["ORCH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == values["auth"]["existingSecret"] and ref["key"] == values["auth"]["tokensKey"]
    if name == "monitoring":
        (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
        assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard lacks the sidecar label"
        shipped = json.loads((CHART / "dashboards" / "orchestrator.json").read_text())
        assert json.loads(cm["data"]["orchestrator.json"]) == shipped, "dashboard ConfigMap differs from the JSON"
        sms = by_kind(docs, "ServiceMonitor")
        assert len(sms) == 2 and all(s["metadata"]["labels"]["release"] == "kube-prometheus-stack" for s in sms)
        np_ = by_kind(docs, "NetworkPolicy")
        assert np_, "networkPolicy.enabled renders no NetworkPolicy"
        assert by_kind(docs, "Ingress"), "ingress enabled but not rendered"


# --- global checks ---------------------------------------------------------------------------

def check_notes(helm: Helm) -> None:
    notes = helm.notes([])
    assert f"port-forward service/{RELEASE}-orchestrator-coordinator 7070:7070" in notes, "NOTES: no port-forward"
    assert 'orchctl --server "$ORCH_SERVER" --token "$ORCH_TOKEN"' in notes, "NOTES: no orchctl command"
    assert "get secret orchestrator-auth" in notes, "NOTES: does not say where the token is"
    notes = helm.notes(["--set", "coordinator.ingress.enabled=true",
                        "--set", "coordinator.ingress.tls[0].secretName=t",
                        "--set", "coordinator.ingress.tls[0].hosts[0]=orchestrator.example.invalid"])
    assert "ORCH_SERVER=https://orchestrator.example.invalid" in notes, "NOTES: ingress URL missing"
    notes = helm.notes(["--set", "auth.noAuth=true"])
    assert "WARNING" in notes and "--token" not in notes, "NOTES: noAuth is not flagged"


def check_dashboard_copies() -> None:
    chart_copy = (CHART / "dashboards" / "orchestrator.json").read_bytes()
    deploy_copy = (ROOT / "deploy" / "grafana" / "orchestrator.json").read_bytes()
    assert chart_copy == deploy_copy, \
        "helm/orchestrator/dashboards/orchestrator.json and deploy/grafana/orchestrator.json differ " \
        "(the chart's copy is canonical: cp it over deploy/grafana/)"


def check_dashboard_queries() -> None:
    dash = json.loads((CHART / "dashboards" / "orchestrator.json").read_text())
    assert dash["uid"] and dash["title"], "dashboard needs uid and title"
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: hard-coded data source"
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", v["definition"])
            assert m, f"variable {v['name']}: unexpected query {v['definition']}"
            exprs.append((f"variable {v['name']}", m.group(1)))
    assert len(exprs) >= 10, "dashboard has too few queries"
    for where, expr in exprs:
        check_promql(f"dashboard {where}", expr.replace("$__rate_interval", "5m"), APP_METRICS)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def check_prometheus_config(config: Path) -> None:
    path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    text = path.read_text()
    check_yamllint(text, config)
    conf = yaml.safe_load(text)
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert {"orchestrator-coordinator", "orchestrator-worker"} <= set(jobs), f"scrape jobs: {sorted(jobs)}"
    for j in jobs.values():
        assert j.get("metrics_path", "/metrics") == "/metrics"
        assert j.get("static_configs") or j.get("file_sd_configs"), f"{j['job_name']}: no targets"
        for sc in j.get("static_configs", []):
            for t in sc["targets"]:
                assert re.fullmatch(r"[\w.-]+:\d+", t), f"bad target {t}"
    assert "127.0.0.1:7070" in jobs["orchestrator-coordinator"]["static_configs"][0]["targets"]
    # What `orchctl local up` writes (cluster.rs, prometheus-targets.json) is read by file_sd.
    local = jobs["orchestrator-local"]["file_sd_configs"][0]["files"]
    assert local == ["local-targets.json"], local


def check_values_files_lint(config: Path) -> None:
    for f in ("Chart.yaml", "values.yaml", "values-dev.yaml", "values-prod.yaml"):
        try:
            check_yamllint((CHART / f).read_text(), config)
        except AssertionError as e:
            raise AssertionError(f"{f}: {e}") from None
    check_yamllint((ROOT / "helm" / "examples" / "prometheus-adapter-values.yaml").read_text(), config)
    json.loads((CHART / "values.schema.json").read_text())


def check_adapter_rule() -> None:
    conf = yaml.safe_load((ROOT / "helm" / "examples" / "prometheus-adapter-values.yaml").read_text())
    rules = conf["rules"]["custom"]
    metric = yaml.safe_load((CHART / "values.yaml").read_text())["autoscaling"]["hpa"]["metricName"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric]
    assert "orch_worker_slots_busy" in rule["metricsQuery"] and "orch_worker_slots_total" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod", "the metric must be per pod"


# Values whose content is a free-form map or list; README documents them as one row.
OPAQUE_VALUES = {"resources", "podAnnotations", "podLabels", "nodeSelector", "tolerations", "affinity",
                 "topologySpreadConstraints", "behavior", "strategy", "labels", "annotations", "keys",
                 "extraEnv", "extraVolumes", "extraVolumeMounts", "hosts", "tls", "pullSecrets", "commonLabels",
                 "accessModes"}


def check_readme_values_table() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (ROOT / "helm" / "README.md").read_text()
    assert "\n## Values\n" in readme, "helm/README.md has no Values section"
    readme = readme.split("\n## Values\n", 1)[1]
    keys: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = prefix + k
            if key.startswith("nats.") and key != "nats.enabled":
                continue  # the NATS chart's own values
            if isinstance(v, dict) and v and k not in OPAQUE_VALUES:
                walk(v, key + ".")
            else:
                keys.append(key)

    walk(values, "")
    missing = [k for k in keys if f"| `{k}` |" not in readme]
    assert not missing, f"helm/README.md has no row for {missing}"
    documented = set(re.findall(r"^\| `([\w.]+)` \|", readme, re.M))
    stale = sorted(documented - set(keys) - {"nats.enabled"})
    assert not stale, f"helm/README.md documents values that do not exist: {stale}"


def check_dockerfile(hadolint: str | None) -> None:
    path = ROOT / "deploy" / "docker" / "Dockerfile"
    text = path.read_text()
    assert "cargo build --release --locked --bins" in text, "the image build differs from the local build"
    stages = {m.group(2) for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)}
    assert {"builder", "coordinator", "worker", "worker-claude-code"} <= set(stages), f"stages: {sorted(stages)}"
    assert "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" in text and "CLAUDE_CODE_VERSION=2.1.332" in text, \
        "the claude-code variant must pin @anthropic-ai/claude-code@2.1.332"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    blocks = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    for block in blocks:
        name = block.split()[2] if len(block.split()) > 2 and block.split()[1].upper() == "AS" else ""
        if name not in ("coordinator", "worker", "worker-claude-code"):
            continue
        assert re.search(r"^USER\s+65532:65532$", block, re.M), f"{name}: does not run as 65532"
        assert re.search(r"^HEALTHCHECK\s", block, re.M), f"{name}: no HEALTHCHECK"
        assert re.search(r"^ENTRYPOINT\s+\[", block, re.M), f"{name}: no exec-form ENTRYPOINT"
        port = values["coordinator"]["port"] if name == "coordinator" else values["worker"]["metricsPort"]
        assert re.search(rf"^EXPOSE\s+{port}$", block, re.M), f"{name}: does not EXPOSE {port}"
        assert f"127.0.0.1:{port}/healthz" in block, f"{name}: HEALTHCHECK is not on /healthz:{port}"
    if hadolint:
        out = subprocess.run([hadolint, "--failure-threshold", "style", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"hadolint:\n{out.stdout}{out.stderr}"


def check_dockerignore() -> None:
    cargo = (ROOT / "Cargo.toml").read_text()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", cargo).group(1)
    members = re.findall(r'"([^"]+)"', members)
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore should exclude everything by default"
    for f in ["Cargo.toml", "Cargo.lock"] + [f"{m}/" for m in members]:
        assert f"!{f}" in lines, f".dockerignore does not let {f} into the build context"
    assert "**/target/" in lines, ".dockerignore must keep target/ out of the context"


# --- the binaries accept the chart's environment ---------------------------------------------

def find_bin_dir(given: str | None) -> Path | None:
    if given:
        return Path(given)
    candidates = [ROOT / "target" / p for p in ("release", "debug")]
    found = [c for c in candidates if (c / "orch-coordinator").exists() and (c / "orch-worker").exists()]
    if not found:
        return None
    return max(found, key=lambda c: (c / "orch-worker").stat().st_mtime)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pod_env(c: dict, port: int) -> dict[str, str]:
    """The container's environment as Kubernetes would build it, with stand-ins for Secrets and
    the downward API, listeners on free loopback ports and servers on a closed loopback port."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            if e["name"] == "ORCH_TOKEN":
                value = "0123456789abcdef0123456789abcdef"
            elif e["name"].endswith("_URL"):
                value = "https://stand-in.invalid/" + e["name"].lower()
            else:
                value = "stand-in-" + e["name"].lower()
        elif "fieldRef" in e["valueFrom"]:
            value = f"{RELEASE}-orchestrator-worker-5d9f8-x2x7q"
        else:
            raise AssertionError(f"unknown env source {e}")
        env[e["name"]] = value
    for key in ("ORCH_LISTEN", "ORCH_WORKER_LISTEN"):
        if key in env:
            env[key] = "127.0.0.1:0"
    for key in ("ORCH_NATS_URL", "ORCH_REDIS_URL"):
        env[key] = re.sub(r"@?[^@/:]+:\d+(?=(/\d+)?$)", lambda m: ("@" if m.group(0).startswith("@") else "")
                          + f"127.0.0.1:{port}", env[key])
    return env


def check_binary_accepts_env(bin_dir: Path, docs: list[dict], component: str) -> None:
    d = one(docs, "Deployment", component)
    c = container(d, component)
    binary = bin_dir / f"orch-{component}"
    # Every ORCH_* variable the chart sets must be one the binary reads (clap ignores others).
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30).stdout
    known = set(re.findall(r"\[env:\s+(ORCH_[A-Z_]+)", help_text))
    assert known, f"orch-{component} --help lists no environment variables"
    unknown = sorted(e["name"] for e in c.get("env", []) if e["name"].startswith("ORCH_") and e["name"] not in known)
    assert not unknown, f"orch-{component} does not read {unknown} (it reads {sorted(known)})"
    port = closed_port()
    env = pod_env(c, port)
    assert f"127.0.0.1:{port}" in env["ORCH_NATS_URL"], env["ORCH_NATS_URL"]
    env["PATH"] = "/usr/bin:/bin"
    with tempfile.TemporaryDirectory() as home:
        env["HOME"] = home
        # A pod has a /tmp of its own: the worker's default data directory (under it, named
        # after the pod) must not be shared by the combinations checked in parallel here.
        env["TMPDIR"] = home
        if "ORCH_CONFIG" in env:
            # The chart's worker.toml (a ConfigMap) naming pool credentials as files of the
            # mounted providers Secret: both written here, the keys as stand-ins.
            maps = [m for m in by_kind(docs, "ConfigMap") if "worker.toml" in m.get("data", {})]
            assert maps, "ORCH_CONFIG is set but no ConfigMap holds worker.toml"
            toml = maps[0]["data"]["worker.toml"].replace("/etc/orch/credentials", home)
            for key in re.findall(re.escape(home) + r"/([-._a-zA-Z0-9]+)", toml):
                (Path(home) / key).write_text("stand-in-key\n")
            config = Path(home) / "worker.toml"
            config.write_text(toml)
            env["ORCH_CONFIG"] = str(config)
        if "ORCH_NATS_CA_FILE" in env:
            # The mounted Secret's file, which the binary checks exists (its contents are read
            # only when it connects, and the NATS port here is closed).
            ca = Path(home) / "nats-ca.crt"
            ca.write_text("")
            env["ORCH_NATS_CA_FILE"] = str(ca)
        proc = subprocess.Popen([str(binary)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise AssertionError(f"orch-{component} exited with {proc.returncode} on the chart's environment:\n{err}")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _, err = proc.communicate()
    if env.get("ORCH_LOG_FORMAT") == "json":
        first = next((ln for ln in err.splitlines() if ln.strip()), None)
        assert first, f"orch-{component} logged nothing"
        try:
            json.loads(first)
        except ValueError:
            raise AssertionError(f"orch-{component} does not log JSON with ORCH_LOG_FORMAT=json: {first!r}") from None


# --- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--helm", required=True)
    ap.add_argument("--hadolint")
    ap.add_argument("--nats-chart", help="an unpacked NATS chart to use instead of the offline stand-in")
    ap.add_argument("--bin-dir", help="where orch-coordinator and orch-worker are (default: target/{release,debug})")
    args = ap.parse_args()

    yamllint_config = Path(__file__).resolve().parent / "yamllint.yaml"
    r = Runner()
    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        tmp = Path(tmp)
        chart = offline_chart(tmp, Path(args.nats_chart) if args.nats_chart else None)
        helm = Helm(args.helm, chart, tmp / "helm-home")

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            renders = dict(zip(COMBOS, pool.map(helm.template, COMBOS.values())))
            rejects = list(pool.map(lambda item: (item[0], item[2], helm.template(item[1])), REJECTED))
            lints = list(pool.map(lambda extra: (extra, helm.run(
                "lint", "--strict", str(chart), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *extra)),
                [[], ["-f", str(CHART / "values-dev.yaml")], ["-f", str(CHART / "values-prod.yaml")], EXTERNAL,
                 MONITORING]))

        for extra, out in lints:
            label = " ".join(extra[-1:]) if extra else "defaults"
            def lint_ok(out=out):
                assert out.returncode == 0, f"helm lint --strict failed:\n{out.stdout}\n{out.stderr}"
            r.run(f"helm lint --strict [{Path(label).name}]", lint_ok)

        parsed: dict[str, list[dict]] = {}
        for name, out in renders.items():
            def rendered(out=out, name=name):
                assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
                parsed[name] = parse_docs(out.stdout)
            r.run(f"helm template [{name}]", rendered)

        for name, docs in parsed.items():
            values = chart_values(COMBOS[name])
            r.run(f"kubernetes {KUBE_VERSION} schemas, strict [{name}]", check_kubernetes_schemas, docs)
            r.run(f"yamllint rendered manifests [{name}]", check_yamllint, renders[name].stdout, yamllint_config)
            r.run(f"coordinator probes /healthz and /readyz [{name}]", check_coordinator_probes, docs)
            r.run(f"worker probes, preStop and drain grace [{name}]", check_worker_probes_and_drain, docs, values)
            r.run(f"metrics ports and services [{name}]", check_metrics_ports, docs)
            r.run(f"secrets only by reference [{name}]", check_secrets_by_reference, docs)
            r.run(f"non-root, read-only pods [{name}]", check_security_context, docs)
            r.run(f"selectors and scale targets [{name}]", check_selectors, docs)
            r.run(f"CRDs: ServiceMonitor, PrometheusRule, ScaledObject [{name}]", check_crds, docs, values)
            r.run(f"combination specifics [{name}]", check_combo_specifics, name, docs, values)

        for label, words, out in rejects:
            def rejected(out=out, words=words, label=label):
                assert out.returncode != 0, f"helm accepted {label}"
                missing = [w for w in words if w not in out.stderr]
                assert not missing, f"error does not mention {missing}:\n{out.stderr.strip()}"
            r.run(f"values rejected: {label}", rejected)
        # Print one of the messages, so the log shows what a user sees.
        example = next(out.stderr for label, _, out in rejects if label == "worker.slots=0")
        print("     e.g. " + " | ".join(ln.strip() for ln in example.strip().splitlines()))

        r.run("NOTES.txt: API address and orchctl command", check_notes, helm)
        r.run("dashboard: chart copy == deploy/grafana copy", check_dashboard_copies)
        r.run("dashboard: queries only exported metrics", check_dashboard_queries)
        r.run("deploy/prometheus/prometheus.yml", check_prometheus_config, yamllint_config)
        r.run("values files and examples pass yamllint", check_values_files_lint, yamllint_config)
        r.run("prometheus-adapter rule serves the HPA metric", check_adapter_rule)
        r.run("Dockerfile: stages, users, probes" + (", hadolint" if args.hadolint else ""),
              check_dockerfile, args.hadolint)
        r.run(".dockerignore lets every workspace member in", check_dockerignore)
        r.run("helm/README.md documents every value", check_readme_values_table)

        bin_dir = find_bin_dir(args.bin_dir)
        if args.bin_dir and not (bin_dir / "orch-worker").exists():
            r.run("binaries in --bin-dir", lambda: (_ for _ in ()).throw(
                AssertionError(f"no orch-coordinator/orch-worker in {bin_dir}")))
        elif bin_dir is None:
            print("skip binaries accept the chart's environment: no target/{release,debug}/orch-* (cargo build first)")
        else:
            r.run_parallel([
                (f"orch-{component} ({bin_dir.name}) accepts the chart's environment [{combo}]",
                 check_binary_accepts_env, bin_dir, parsed[combo], component)
                for combo in ("defaults", "external", "noauth", "prod", "credentials") if combo in parsed
                for component in ("coordinator", "worker")
            ])

    print(f"{r.passed} passed, {len(r.failed)} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
