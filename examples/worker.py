#!/usr/bin/env python3
"""A Ripen worker in plain Python (standard library only).

Serves one worker queue: claims tasks with a long poll, runs them, and
reports each result with its lease. Usage:
    RIPEN_URL=http://127.0.0.1:8080 python3 examples/worker.py billing
A server with API keys needs a key with the worker scope in RIPEN_API_KEY.
"""
import json, os, sys, urllib.error, urllib.request

URL = os.environ.get("RIPEN_URL", "http://127.0.0.1:8080")
QUEUE = sys.argv[1] if len(sys.argv) > 1 else "billing"

HEADERS = {"Content-Type": "application/json"}
if os.environ.get("RIPEN_API_KEY"):
    HEADERS["Authorization"] = "Bearer " + os.environ["RIPEN_API_KEY"]

def post(path, body):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), HEADERS)
    with urllib.request.urlopen(req, timeout=70) as answer:
        return json.load(answer)

def handle(task):
    # The work itself: here, an invoice for the entity's payload.
    return {"invoice": "inv-" + task["entity_id"], "amount": task["payload"].get("amount", 0)}

print("worker ready", flush=True)
while True:
    claimed = post(f"/v1/queues/{QUEUE}/claim", {"max": 10, "wait_ms": 30000, "worker_id": f"py-{os.getpid()}"})
    for task in claimed["tasks"]:
        done = {"lease": task["lease"]}
        try:
            done["output"] = handle(task)
            verb = "complete"
        except Exception as e:  # a failure the step's retry policy handles
            done.update(error=str(e), retryable=True)
            verb = "fail"
        try:
            post(f"/v1/tasks/{task['task_id']}/{verb}", done)
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: the lease expired and another attempt took over
                raise
