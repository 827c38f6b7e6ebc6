#!/usr/bin/env bash
# Console page latency with a full log: a release server on a fresh data dir, 20
# sources, 1,000,000 events appended through /v1/batch (spread over the sources), the
# warehouse caught up; then every console page fetched N times with a session cookie
# and its p50/p95/max printed. Not run by CI (it takes minutes); numbers go into the
# README's Console section.
#
#   cargo build --release -p tributary
#   bash scripts/console-perf.sh [EVENTS] [REQUESTS_PER_PAGE]
set -euo pipefail
EVENTS="${1:-1000000}"
N="${2:-200}"
BIN="${TRIBUTARY_BIN:-${CARGO_TARGET_DIR:-target}/release/tributary}"
DIR="$(mktemp -d)"
PORT="${PORT:-18099}"
URL="http://127.0.0.1:$PORT"
TOKEN="perf-token"
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT

TRIBUTARY_ADMIN_TOKEN="$TOKEN" "$BIN" serve --data-dir "$DIR" --listen "127.0.0.1:$PORT" >"$DIR/server.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -fs "$URL/health" >/dev/null && break; sleep 0.1; done

python3 - "$URL" "$TOKEN" "$EVENTS" <<'PY'
import base64, json, sys, time, urllib.request, uuid
from concurrent.futures import ThreadPoolExecutor
url, token, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
def admin(method, path, body=None):
    req = urllib.request.Request(url + "/api/v1" + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": "Bearer " + token, "content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
keys = []
for i in range(20):
    kind = "activecampaign" if i % 2 == 0 else "http"
    s = admin("POST", "/sources", {"type": kind, "name": f"Source {i}", "schema": f"s{i}"})
    keys.append(s["write_key"])
names = ["Email Delivered", "Email Opened", "Email Link Clicked", "Page Viewed", "Signed Up"]
def send(b):
    key = keys[b % len(keys)]
    batch = [{"type": "track", "event": names[(b + j) % len(names)], "anonymousId": f"user{(b * 7 + j) % 5000}@example.com",
              "messageId": str(uuid.uuid4()), "properties": {"campaign_id": str(b % 30), "campaign_name": f"Campaign {b % 30}", "n": j}}
             for j in range(500)]
    body = json.dumps({"batch": batch}).encode()
    auth = base64.b64encode((key + ":").encode()).decode()
    req = urllib.request.Request(url + "/v1/batch", data=body, headers={"authorization": "Basic " + auth, "content-type": "application/json"})
    urllib.request.urlopen(req).read()
t = time.time()
with ThreadPoolExecutor(8) as ex:
    list(ex.map(send, range(events // 500)))
print(f"appended {events} events in {time.time() - t:.1f}s", file=sys.stderr)
while True:
    st = admin("GET", "/warehouse")
    if st["lag_events"] == 0:
        break
    time.sleep(2)
print(f"warehouse caught up after {time.time() - t:.1f}s", file=sys.stderr)
PY

COOKIES="$DIR/cookies"
curl -fs -c "$COOKIES" -o /dev/null -H "Origin: $URL" --data-urlencode "token=$TOKEN" "$URL/login"
SRC=$(curl -fs -H "Authorization: Bearer $TOKEN" "$URL/api/v1/sources" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
echo "| page | p50 ms | p95 ms | max ms |"
echo "|---|---:|---:|---:|"
for page in / /sources /sources/new "/sources/$SRC" "/sources/$SRC/debugger" /destinations /destinations/new /warehouse "/reports/email?source=$SRC"; do
    for _ in $(seq "$N"); do
        curl -fs -b "$COOKIES" -o /dev/null -w '%{time_total}\n' "$URL$page"
    done | sort -n | awk -v page="$page" '{ t[NR] = $1 * 1000 } END {
        printf "| `%s` | %.1f | %.1f | %.1f |\n", page, t[int(NR * 0.5)], t[int(NR * 0.95)], t[NR] }'
done
