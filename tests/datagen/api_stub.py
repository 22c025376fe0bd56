"""A scripted OpenAI-compatible chat-completions server for the data-generation tests.

Each request takes the next action of `script` (then `default` forever):
  "ok"         200 with a reply in the paper's format for the request's kind (see `reply_for`)
  "429"        429 with Retry-After: 0
  "500"        500 with an error body
  "timeout"    answers only after `slow_s` seconds (longer than the client's timeout)
  "malformed"  200 with a body that is not JSON
  "nochoices"  200 with JSON that has no choices
  "400"        400 (not retryable)
`hold_after=n`: after n "ok" answers, further requests wait until `release()` (to kill a client
while it has requests in flight). `ok_count` counts "ok" answers sent, `queries` their last user messages; `max_in_flight` the most
requests open at once.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time


def kind_of(messages: list[dict]) -> str:
    system = messages[0]["content"]
    if "Design a conversation" in system:
        return "conversation"
    if "complex questions" in system:
        return "complex"
    return "detail"


def reply_for(messages: list[dict]) -> str:
    """A well-formed reply built from the query's first caption (so a test can tie it to its request)."""
    caption = messages[-1]["content"].splitlines()[0]
    kind = kind_of(messages)
    if kind == "detail":
        return f"The image shows this scene: {caption}"
    if kind == "complex":
        return f"Question:\nWhy does this scene matter?\n===\nAnswer:\nBecause {caption}"
    return (
        f"Question:\nWhat is happening?\n===\nAnswer:\n{caption}\n===\n"
        f"Question:\nIs it daytime?\n===\nAnswer:\nIt looks like daytime in: {caption}"
    )


class ApiStub:
    def __init__(self, script=(), default="ok", slow_s=5.0, hold_after=None, reply=reply_for):
        self.script = list(script)
        self.default = default
        self.slow_s = slow_s
        self.hold_after = hold_after
        self.reply = reply
        self.ok_count = 0
        self.actions: list[str] = []
        self.queries: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> ApiStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_action(self) -> str:
        with self._lock:
            action = self.script.pop(0) if self.script else self.default
            self.actions.append(action)
            return action

    def _handler(self):
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_POST(self):
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._post()
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _post(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                action = stub._next_action()
                if action == "429":
                    return self._send(
                        429,
                        b'{"error": {"message": "rate limited"}}',
                        {"Retry-After": "0"},
                    )
                if action == "500":
                    return self._send(500, b'{"error": {"message": "server error"}}')
                if action == "400":
                    return self._send(400, b'{"error": {"message": "bad request"}}')
                if action == "timeout":
                    time.sleep(stub.slow_s)
                    return self._send(500, b"{}")
                if action == "malformed":
                    return self._send(200, b"<html>not json")
                if action == "nochoices":
                    return self._send(200, b'{"id": "x", "choices": []}')
                with stub._lock:
                    hold = stub.hold_after is not None and stub.ok_count >= stub.hold_after
                if hold:
                    stub._release.wait()
                messages = body["messages"]
                content = stub.reply(messages)
                prompt = sum(len(m["content"]) for m in messages) // 4
                completion = len(content or "") // 4
                with stub._lock:
                    stub.ok_count += 1
                    stub.queries.append(messages[-1]["content"])
                out = {
                    "id": f"chatcmpl-{stub.ok_count}",
                    "object": "chat.completion",
                    "model": body["model"] + "-stub",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
                self._send(200, json.dumps(out).encode())

        return Handler
