#!/usr/bin/env bash
# Console page latency with a full log: a release server on a fresh data dir, 20
# sources, 1,000,000 events appended through /v1/batch (spread over the sources), the
# warehouse caught up; then every console page (and the API twins of the warehouse
# and report pages) fetched N times, one after the other, from this second process
# (curl) with a session cookie, and its p50/p95/max printed as a Markdown table,
# beside the trivial `/health` as the baseline of the same run. The fate page asks
# for the very first event of the log (under ~50,000 newer events of its source).
# Not run by CI (it takes minutes); numbers go into the README's Console section.
#
#   cargo build --release -p tributary
#   bash scripts/console-perf.sh [EVENTS] [REQUESTS_PER_PAGE]
set -euo pipefail
EVENTS="${1:-1000000}"
N="${2:-200}"
BIN="${TRIBUTARY_BIN:-${CARGO_TARGET_DIR:-target}/release/tributary}"
DIR="$(mktemp -d)"
PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
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
              "messageId": "first-event" if b == 0 and j == 0 else str(uuid.uuid4()),
              "properties": {"campaign_id": str(b % 30), "campaign_name": f"Campaign {b % 30}", "n": j,
                             "link_url": f"https://shop.example.com/p/{j % 7}"}}
             for j in range(500)]
    body = json.dumps({"batch": batch}).encode()
    auth = base64.b64encode((key + ":").encode()).decode()
    req = urllib.request.Request(url + "/v1/batch", data=body, headers={"authorization": "Basic " + auth, "content-type": "application/json"})
    urllib.request.urlopen(req).read()
t = time.time()
send(0)  # the first event of the log (the fate page asks for it)
with ThreadPoolExecutor(8) as ex:
    list(ex.map(send, range(1, events // 500)))
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
SRC=$(curl -fs -H "Authorization: Bearer $TOKEN" "$URL/api/v1/sources" | python3 -c 'import json,sys; print([s for s in json.load(sys.stdin) if s["schema"] == "s0"][0]["id"])')
AUTH="Authorization: Bearer $TOKEN"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $EVENTS events, 20 sources, $N requests per page, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| page | p50 ms | p95 ms | max ms | p95 / health p95 |"
echo "|---|---:|---:|---:|---:|"
measure() { # page, extra curl args…
    local page="$1"; shift
    for _ in $(seq "$N"); do
        curl -s "$@" -o /dev/null -w '%{time_total} %{http_code}\n' "$URL$page"
    done | sort -n | awk '{ t[NR] = $1 * 1000; if ($2 != 200) bad++ } END { printf "%.1f %.1f %.1f %d\n", t[int(NR * 0.5)], t[int(NR * 0.95)], t[NR], bad }'
}
FAILED=0
read -r H50 H95 HMAX _ < <(measure /health)
printf '| `/health` (baseline) | %s | %s | %s | 1.0 |\n' "$H50" "$H95" "$HMAX"
row() { # label, page, curl args…
    local label="$1" page="$2"; shift 2
    read -r P50 P95 PMAX BAD < <(measure "$page" "$@")
    # A page that did not answer 200 is not timed: its row says so and the run fails.
    if [ "$BAD" -gt 0 ]; then
        FAILED=1
        printf '| `%s` | %s of %s answers were not 200 | | | |\n' "$label" "$BAD" "$N"
        return
    fi
    printf '| `%s` | %s | %s | %s | %s |\n' "$label" "$P50" "$P95" "$PMAX" "$(awk -v a="$P95" -v b="$H95" 'BEGIN { printf "%.1f", (b > 0 ? a / b : 0) }')"
}
for page in / /sources /sources/new "/sources/$SRC" "/sources/$SRC/debugger" /destinations /destinations/new /warehouse \
        /warehouse/s0/tracks "/reports/email?source=$SRC" "/sources/$SRC/debugger/fate?message_id=first-event"; do
    row "$page" "$page" -b "$COOKIES"
done
row "GET /api/v1/warehouse" /api/v1/warehouse -H "$AUTH"
row "GET /api/v1/reports/email" "/api/v1/reports/email?source=$SRC" -H "$AUTH"
row "GET /api/v1/sources/…/events/first-event" "/api/v1/sources/$SRC/events/first-event" -H "$AUTH"
exit "$FAILED"
