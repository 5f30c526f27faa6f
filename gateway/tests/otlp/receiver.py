#!/usr/bin/env python3
"""An OTLP/HTTP traces receiver for cellgate's tests.

Listens on a free loopback port (printed first), accepts POST /v1/traces with the OTLP JSON
encoding, decodes it strictly with the official OpenTelemetry protobuf definitions
(opentelemetry-proto; unknown or mistyped fields are rejected with 400), and prints one JSON
line per span received.
"""
import base64
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def hex_ids_to_base64(doc):
    # OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping wants base64.
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for f in ID_FIELDS:
                    if f in span:
                        span[f] = base64.b64encode(bytes.fromhex(span[f])).decode()
    return doc


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            if self.path != "/v1/traces" or not self.headers.get("content-type", "").startswith("application/json"):
                raise ValueError("expected POST /v1/traces with application/json")
            msg = ExportTraceServiceRequest()
            json_format.Parse(json.dumps(hex_ids_to_base64(json.loads(body))), msg)
        except Exception as e:  # noqa: BLE001 - report any decoding problem to the sender
            self.send_response(400)
            self.end_headers()
            self.wfile.write(str(e).encode())
            print(json.dumps({"error": str(e)}), flush=True)
            return
        for rs in msg.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), None)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print(json.dumps({
                        "service": service,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: json_format.MessageToDict(a.value) for a in s.attributes},
                    }), flush=True)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def main():
    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
