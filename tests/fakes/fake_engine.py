#!/usr/bin/env python3
"""A stand-in engine for faults a real llama-server cannot be made to show on demand.

    fake_engine.py MODE [llama-server args...]

MODE: never-healthy (listens, /health answers 503 forever), exit-on-start (exits 3 at
once), crash-on-request (healthy, then exits 9 on the first completion request),
undercount (counts every prompt as 3 tokens, but refuses it as 1500 tokens long, as
llama-server does, when its context is under 2048).
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

MODE = sys.argv[1]
CONTEXT = int(sys.argv[sys.argv.index("--ctx-size") + 1]) if "--ctx-size" in sys.argv else 4096
OVERFLOW_PROMPT = 1500


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            if MODE == "never-healthy":
                self._json(503, {"error": {"message": "Loading model", "code": 503}})
            else:
                self._json(200, {"status": "ok"})
        elif self.path == "/slots":
            self._json(200, [{"id": 0, "n_ctx": CONTEXT}])
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        if self.path == "/apply-template":
            self._json(200, {"prompt": "x"})
            return
        if self.path == "/tokenize":
            self._json(200, {"tokens": [1, 2, 3]})
            return
        if MODE == "undercount":
            self._undercount()
            return
        print("fake engine: crashing on request", flush=True)
        os._exit(9)

    def _undercount(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if CONTEXT < 2048:
            message = (
                f"request ({OVERFLOW_PROMPT} tokens) exceeds the available context size ({CONTEXT} tokens)"
            )
            error = {
                "code": 400,
                "message": message,
                "type": "exceed_context_size_error",
                "n_prompt_tokens": OVERFLOW_PROMPT,
                "n_ctx": CONTEXT,
            }
            self._json(400, {"error": error})
        else:
            answer = {
                "object": "chat.completion",
                "model": "fake",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
                ],
            }
            self._json(200, answer)


def main() -> None:
    print(f"fake engine mode={MODE}", flush=True)
    if MODE == "exit-on-start":
        print("fake engine: cannot load model", flush=True)
        sys.exit(3)
    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(f"main: server is listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
