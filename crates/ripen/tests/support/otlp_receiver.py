"""A test OTLP/HTTP trace receiver: decodes every export with the official
opentelemetry-proto definitions and appends one JSON object per span to the
file given as the first argument. Prints "listening PORT" once it serves."""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

OUT = sys.argv[1]

def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        with open(OUT, "a") as out:
            for rs in request.resource_spans:
                resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.write(json.dumps({
                            "content_type": self.headers["Content-Type"],
                            "path": self.path,
                            "resource": resource,
                            "scope": ss.scope.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                            "status_code": s.status.code,
                            "status_message": s.status.message,
                            "links": [[l.trace_id.hex(), l.span_id.hex()] for l in s.links],
                        }) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Receiver)
print("listening", server.server_address[1], flush=True)
server.serve_forever()
