"""A scripted OpenAI-compatible ``/v1/chat/completions`` stub on a loopback port.

`script` maps a marker string to the list of replies for requests whose user message contains it,
used in order (the last one repeats): ``("ok", content)``, ``(status_code, body)`` or
``("hang", seconds)`` (sleeps before answering, to trip a client timeout). Every request's user
message is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "stub-judge-0001"


class Stub:
    def __init__(self, script: dict[str, list]):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def next_reply(self, content: str):
        with self.lock:
            self.requests.append(content)
            for marker, replies in self.script.items():
                if marker in content:
                    return replies.pop(0) if len(replies) > 1 else replies[0]
        return ("ok", "5 5\nno script for this request")


@contextlib.contextmanager
def serve_stub(script: dict[str, list]):
    stub = Stub(script)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = next(m["content"] for m in body["messages"] if m["role"] == "user")
            kind, value = stub.next_reply(user)
            if kind == "hang":
                time.sleep(value)
                kind, value = 500, "late"
            if kind == "ok":
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": VERSION,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": value}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                }
                data, status = json.dumps(payload).encode(), 200
            else:
                data, status = json.dumps({"error": {"message": str(value)}}).encode(), int(kind)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", stub
    finally:
        server.shutdown()
        server.server_close()
