#!/usr/bin/env bash
# Runs the README's quickstart block (between <!-- quickstart:begin --> and
# <!-- quickstart:end -->) exactly as written, as a newcomer pasting it would: in a fresh
# copy of the repository (so no tributary-data, no source.json), with a clean environment,
# under `bash -euo pipefail` so the first command that fails fails the check, and then
# checks what the block printed.
#
# The block uses the README's own address, localhost:8088. To give it a port of its own
# (other servers on this machine may hold 8088), it runs in a fresh network namespace
# (`unshare --net`, as root); where that is not possible it runs directly if 8088 is free.
#
# Usage: .ci/quickstart.sh [DIR]   DIR: a copy of the repository to run in (default: a new
# copy under a temporary directory). The block's `./target` is linked to $CARGO_TARGET_DIR
# when that is set, so the build reuses compiled dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf 'quickstart: %s\n' "$*" >&2; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ $# -ge 1 ]; then
    WORK=$(cd "$1" && pwd)
else
    WORK="$TMP/tributary"
    mkdir -p "$WORK"
    git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -C "$WORK" -xf -
fi
[ -e "$WORK/tributary-data" ] && { log "$WORK/tributary-data exists: not a fresh data dir"; exit 1; }

# The block, without its ``` fences.
awk '/<!-- quickstart:begin -->/{f=1; next} /<!-- quickstart:end -->/{f=0} f && !/^```/' \
    "$WORK/README.md" >"$TMP/block.sh"
[ -s "$TMP/block.sh" ] || { log "no quickstart block in $WORK/README.md"; exit 1; }
log "running $(wc -l <"$TMP/block.sh") lines from README.md in $WORK"

if [ -n "${CARGO_TARGET_DIR:-}" ] && [ ! -e "$WORK/target" ]; then
    ln -s "$CARGO_TARGET_DIR" "$WORK/target"
fi
# Download what the build needs now: the namespace has no network.
(cd "$WORK" && cargo fetch --quiet)

# A clean environment: nothing of ours (TRIBUTARY_*, CARGO_TARGET_DIR) leaks in.
CLEAN_ENV=(env -i HOME="$HOME" PATH="$PATH" TERM=dumb)
[ -n "${CARGO_HOME:-}" ] && CLEAN_ENV+=(CARGO_HOME="$CARGO_HOME")
[ -n "${RUSTUP_HOME:-}" ] && CLEAN_ENV+=(RUSTUP_HOME="$RUSTUP_HOME")
RUN=(bash -c 'cd "$1" && exec bash -euo pipefail "$2"' quickstart "$WORK" "$TMP/block.sh")
set +e
if unshare --net true 2>/dev/null; then
    timeout 1800 unshare --net "${CLEAN_ENV[@]}" bash -c 'ip link set lo up && exec "$@"' netns \
        "${RUN[@]}" >"$TMP/out" 2>&1
    rc=$?
elif ! (exec 3<>/dev/tcp/127.0.0.1/8088) 2>/dev/null; then
    log "no network namespace; 8088 is free, running directly"
    timeout 1800 "${CLEAN_ENV[@]}" "${RUN[@]}" >"$TMP/out" 2>&1
    rc=$?
else
    log "cannot run: no network namespace and 127.0.0.1:8088 is in use"
    exit 1
fi
set -e
# A block that failed before its `kill` leaves its server running: stop it (its pid is
# in the data dir's lock file) and wait for it to go.
if [ -f "$WORK/tributary-data/lock" ]; then
    pid=$(cat "$WORK/tributary-data/lock" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        grep -q tributary "/proc/$pid/cmdline" 2>/dev/null; then
        log "stopping the server the block left running (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
fi
cat "$TMP/out"
[ "$rc" -eq 0 ] || { log "the block failed (exit $rc); server log:"; cat "$WORK/tributary.log" >&2 || true; exit 1; }

# What a reader is told to expect.
fail=0
expect() { grep -q -- "$1" "$TMP/out" || { log "expected $2 in the output"; fail=1; }; }
expect '"write_key":"wk_' "the new source's write key"
expect '{"success":true}' 'the track call accepted'
expect '"event":"Signed Up"' 'the event in the debugger'
expect 'write key:   wk_' "the CLI's new source"
expect 'activecampaign' 'the CLI source list'
expect '^u1 *| pro' 'the warehouse row'
[ "$fail" -eq 0 ] || exit 1
log "ok: the README quickstart works as pasted"
