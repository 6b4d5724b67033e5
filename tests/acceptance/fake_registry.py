"""A small Confluent-compatible Schema Registry for the acceptance test: an
edge Hartonomous does not own, so a local fake is allowed. Standard library
only. It implements what a standard Confluent producer (confluent-kafka's
AvroSerializer with auto.register.schemas) and the processor's registry
client call:

  POST /subjects/{subject}/versions     register-or-lookup: {"id": N, ...}
  POST /subjects/{subject}              lookup: the registered version, or 404 40403
  GET  /schemas/ids/{id}                {"schema": "..."}, or 404 40403
  GET  /subjects/{subject}/versions/latest

Schemas are identified by their exact text per subject; ids are global and
start at 1. Usage: python3 fake_registry.py PORT_FILE  (binds 127.0.0.1:0 and
writes the port to PORT_FILE once it listens; stops on SIGTERM).
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LOCK = threading.Lock()
SCHEMAS: dict[int, str] = {}            # id -> schema text
SUBJECTS: dict[str, list[int]] = {}     # subject -> ids, in version order


def register(subject: str, schema: str) -> tuple[int, int]:
    with LOCK:
        sid = next((i for i, s in SCHEMAS.items() if s == schema), None)
        if sid is None:
            sid = len(SCHEMAS) + 1
            SCHEMAS[sid] = schema
        versions = SUBJECTS.setdefault(subject, [])
        if sid not in versions:
            versions.append(sid)
        return sid, versions.index(sid) + 1


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self, what: str) -> None:
        self.answer(404, {"error_code": 40403 if what == "schema" else 40401, "message": f"{what} not found"})

    def do_GET(self):
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
            schema = SCHEMAS.get(int(parts[2]))
            return self.answer(200, {"schema": schema}) if schema is not None else self.not_found("schema")
        if len(parts) == 4 and parts[0] == "subjects" and parts[2] == "versions" and parts[3] == "latest":
            versions = SUBJECTS.get(parts[1])
            if not versions:
                return self.not_found("subject")
            sid = versions[-1]
            return self.answer(200, {"subject": parts[1], "version": len(versions), "id": sid, "schema": SCHEMAS[sid]})
        self.answer(404, {"error_code": 404, "message": "unknown path"})

    def do_POST(self):
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        schema = body.get("schema")
        if parts and parts[0] == "subjects" and len(parts) == 3 and parts[2] == "versions":
            sid, version = register(parts[1], schema)
            return self.answer(200, {"id": sid, "subject": parts[1], "version": version, "schema": schema})
        if parts and parts[0] == "subjects" and len(parts) == 2:
            versions = SUBJECTS.get(parts[1], [])
            for v, sid in enumerate(versions, 1):
                if SCHEMAS[sid] == schema:
                    return self.answer(200, {"id": sid, "subject": parts[1], "version": v, "schema": schema})
            return self.not_found("schema")
        self.answer(404, {"error_code": 404, "message": "unknown path"})


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
