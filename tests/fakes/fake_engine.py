#!/usr/bin/env python3
"""A stand-in engine for faults a real llama-server cannot be made to show on demand.

    fake_engine.py MODE [llama-server args...]

MODE: never-healthy (listens, /health answers 503 forever), exit-on-start (exits 3 at
once), crash-on-request (healthy, then exits 9 on the first completion request),
undercount (counts every prompt as 3 tokens, but refuses it as 1500 tokens long, as
llama-server does, when its context is under 2048), full-once and full-always (the first,
or every, completion request fails as llama-server's do when its KV cache runs out: HTTP
500 "Context size has been exceeded.", for a stream a first event with that error),
bare-error (completion requests get 415 with an empty body, as llama-server answers a
body it cannot decode), full-after-role (the first stream opens with a role event for
each of two answers, as llama-server's chat streams with n > 1 do, then has that error).
For engine = "openai" (`--port N` given): count-garbage (POST /tokenize answers without
vLLM's `count`), count-missing (no /tokenize nor /apply-template: 404), count-hangs
(POST /tokenize never answers), drop (a completion request is read, then its
connection closed without an answer; GET /completions says how many came), serial
(one connection at a time, as a single-threaded HTTP server serves).
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

MODE = sys.argv[1]
CONTEXT = int(sys.argv[sys.argv.index("--ctx-size") + 1]) if "--ctx-size" in sys.argv else 4096
PORT = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
OVERFLOW_PROMPT = 1500
FULL = {"code": 500, "message": "Context size has been exceeded.", "type": "server_error"}
ANSWER = {
    "object": "chat.completion",
    "model": "fake",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
}
CHUNK = {
    "object": "chat.completion.chunk",
    "model": "fake",
    "choices": [{"index": 0, "finish_reason": "stop", "delta": {"content": "ok"}}],
}
completions = 0


def _opening(index: int) -> dict[str, object]:
    """A chat stream's first event for one answer: its role, no text yet."""
    delta = {"role": "assistant", "content": None}
    return {**CHUNK, "choices": [{"finish_reason": None, "index": index, "delta": delta}]}


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
        elif self.path == "/completions":
            self._json(200, {"completions": completions})
        elif self.path == "/slots":
            self._json(200, [{"id": 0, "n_ctx": CONTEXT}])
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        if MODE.startswith("count-") and self.path in ("/apply-template", "/tokenize"):
            self._count_fault()
            return
        if self.path == "/apply-template":
            self._json(200, {"prompt": "x"})
            return
        if self.path == "/tokenize":
            self._json(200, {"tokens": [1, 2, 3]})
            return
        if MODE == "crash-on-request":
            print("fake engine: crashing on request", flush=True)
            os._exit(9)
        global completions
        completions += 1
        stream = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))).get("stream") is True
        if MODE == "drop":
            self.close_connection = True
            self.connection.shutdown(2)  # as a box that dies with the request read
        elif MODE == "undercount":
            self._undercount()
        elif MODE == "bare-error":
            self.send_response(415)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif MODE == "full-after-role" and completions == 1 and stream:
            self._stream(*(_opening(i) for i in range(2)), {"error": FULL})
        elif MODE == "full-always" or (MODE == "full-once" and completions == 1):
            if stream:
                self._stream({"error": FULL})
            else:
                self._json(500, {"error": FULL})
        elif stream:
            self._stream(CHUNK, "[DONE]")
        else:
            self._json(200, ANSWER)

    def _stream(self, *events: object) -> None:
        """As llama-server: a stream has begun (200) before its first event, even an error;
        events as compact JSON, as it writes them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
            self.wfile.write(f"data: {data}\n\n".encode())

    def _count_fault(self) -> None:
        if MODE == "count-garbage":
            self._json(200, {"tokens": [1, 2, 3]})
        elif MODE == "count-missing":
            self._json(404, {"error": {"message": "Not Found"}})
        else:
            time.sleep(60)

    def _undercount(self) -> None:
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
            self._json(200, ANSWER)


def main() -> None:
    print(f"fake engine mode={MODE}", flush=True)
    if MODE == "exit-on-start":
        print("fake engine: cannot load model", flush=True)
        sys.exit(3)
    server = (HTTPServer if MODE == "serial" else ThreadingHTTPServer)(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"main: server is listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
