"""Drives the official Segment Python SDK (segment-analytics-python) against a server.

Usage: python_client.py URL WRITE_KEY < calls.json
(URL and WRITE_KEY may instead come from TRIBUTARY_URL and TRIBUTARY_WRITE_KEY.)

stdin is a JSON array of Segment calls in wire naming, e.g.
{"type": "track", "userId": "u1", "event": "Signed Up", "properties": {...}, "context": {...}}.
Each is handed to the SDK's own method (track, identify, page, screen, group, alias); the SDK
batches them (small upload_size, gzip on) and posts to URL/v1/batch. After shutdown() the
script prints one JSON line per call: {"index": i, "messageId": "<what the SDK generated>"}.
Exits non-zero if the SDK reports any delivery error.
"""

import json
import logging
import os
import sys

from segment.analytics import Client

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

url = sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIBUTARY_URL"]
write_key = sys.argv[2] if len(sys.argv) > 2 else os.environ["TRIBUTARY_WRITE_KEY"]
calls = json.load(sys.stdin)

errors = []


def on_error(error, batch):
    errors.append(error)
    print("delivery error: %r (%d messages)" % (error, len(batch)), file=sys.stderr)


client = Client(
    write_key,
    host=url,
    gzip=True,
    upload_size=5,  # the SDK's flush_at: several batches for a few dozen calls
    upload_interval=0.2,
    max_retries=3,
    timeout=10,
    on_error=on_error,
)


def send(call):
    t = call["type"]
    ids = dict(user_id=call.get("userId"), context=call.get("context"))
    if t == "track":
        return client.track(
            event=call["event"],
            properties=call.get("properties"),
            anonymous_id=call.get("anonymousId"),
            **ids,
        )
    if t == "identify":
        return client.identify(
            traits=call.get("traits"), anonymous_id=call.get("anonymousId"), **ids
        )
    if t in ("page", "screen"):
        return getattr(client, t)(
            name=call.get("name"),
            category=call.get("category"),
            properties=call.get("properties"),
            anonymous_id=call.get("anonymousId"),
            **ids,
        )
    if t == "group":
        return client.group(
            group_id=call["groupId"],
            traits=call.get("traits"),
            anonymous_id=call.get("anonymousId"),
            **ids,
        )
    if t == "alias":
        return client.alias(previous_id=call["previousId"], **ids)
    raise ValueError("unknown call type %r" % t)


sent = []
for i, call in enumerate(calls):
    ok, msg = send(call)
    if not ok:
        print("call %d not queued" % i, file=sys.stderr)
        sys.exit(1)
    sent.append({"index": i, "messageId": msg["messageId"]})

client.shutdown()  # flush() then join(): every queued batch has been posted

if errors:
    sys.exit(1)
for line in sent:
    print(json.dumps(line))
