#!/usr/bin/env python3
"""The services the quickstart's steps call, in one process on port 9000
(standard library only). Each answers Ripen's step contract: a POST with the
entity's payload and the outputs of earlier steps; a 2xx JSON body becomes
the step's output. KYC fails the first attempt of every merchant with a 503,
so that you see a retry: its Retry-After asks Ripen to wait a second."""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Services(BaseHTTPRequestHandler):
    def do_POST(self):
        call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        payload = call["payload"]
        if self.path == "/kyc" and call["attempt"] == 1:
            return self.answer(503, {"error": "the KYC provider is busy"}, retry_after=1)
        if self.path == "/kyc":
            return self.answer(200, {"kyc": "passed", "country": payload["country"]})
        if self.path == "/billing":
            return self.answer(200, {"billing_account": "acct-" + call["entity_id"][:8]})
        if self.path == "/email":
            return self.answer(200, {"sent_to": payload["contact_email"]})
        self.answer(404, {"error": "no such service"})

    def answer(self, status, body, retry_after=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

print("services listening on http://127.0.0.1:9000", flush=True)
ThreadingHTTPServer(("127.0.0.1", 9000), Services).serve_forever()
