"""A stdlib fake OpenAI-compatible chat server on a free loopback port, answering by a script.

``FakeChat(script)``: ``script(request_json) -> str | (status, body_bytes)``; a str becomes
a normal chat completion. Every request body is kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[dict[str, Any]], "str | tuple[int, bytes]"]


class FakeChat:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                body["_path"], body["_auth"] = self.path, self.headers.get("Authorization")
                fake.requests.append(body)
                answer = fake.script(body)
                if isinstance(answer, tuple):
                    status, raw = answer
                else:
                    status, raw = 200, json.dumps({
                        "id": f"chatcmpl-{len(fake.requests)}", "object": "chat.completion",
                        "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "stop",
                                                                 "message": {"role": "assistant", "content": answer}}],
                    }).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeChat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
