"""A webhook receiver for Ripen's tests.

Every POST to any path other than the control ones is a delivery: it is
verified with the reference Standard Webhooks library against the secret the
test gave, and recorded. The test steers it over HTTP:

- PUT /_secret   body: the subscription's secret (whsec_...)
- PUT /_status   body: the HTTP status to answer deliveries with (200 by default)
- PUT /_delay    body: seconds to wait before answering a delivery
- GET /_received the deliveries so far, as a JSON array

Usage: webhook_receiver.py PORT_FILE  (prints nothing; writes its port there)
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

STATE = {"secret": None, "status": 200, "delay": 0.0, "received": []}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length)

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        value = self.body().decode()
        with LOCK:
            if self.path == "/_secret":
                STATE["secret"] = value
            elif self.path == "/_status":
                STATE["status"] = int(value)
            elif self.path == "/_delay":
                STATE["delay"] = float(value)
            else:
                return self.answer(404)
        self.answer(204)

    def do_GET(self):
        if self.path != "/_received":
            return self.answer(404)
        with LOCK:
            body = json.dumps(STATE["received"]).encode()
        self.answer(200, body)

    def do_POST(self):
        raw = self.body()
        with LOCK:
            secret, status, delay = STATE["secret"], STATE["status"], STATE["delay"]
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified, error = False, None
        try:
            Webhook(secret).verify(raw, headers)
            verified = True
        except Exception as e:  # the test reads why
            error = f"{type(e).__name__}: {e}"
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if delay:
            time.sleep(delay)
        with LOCK:
            STATE["received"].append(
                {
                    "path": self.path,
                    "id": headers.get("webhook-id"),
                    "timestamp": headers.get("webhook-timestamp"),
                    "verified": verified,
                    "error": error,
                    "answered": status,
                    "payload": payload,
                }
            )
        self.answer(status, b"{}")


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A sender that died mid-request (the kill -9 test) is expected.
        pass


def main():
    server = Server(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
