"""A small OpenAI-compatible HTTP server for judge tests: a real server on a thread answering
POST /v1/chat/completions deterministically from the prompt it is sent (what a real LLM judge cannot be here).

- pointwise prompts ("Assistant's answer:"): score 1 + (characters of the answer % 5), reason naming the length;
- pairwise prompts ("Answer A:"): `prefer="first"` always answers A (a judge biased by position), `prefer="longer"`
  the longer answer (ties: "tie").
Every request body is kept in `requests`, and the bearer token in `keys`.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _section(text: str, start: str, end: str) -> str:
    found = re.search(re.escape(start) + r"\n(.*?)\n\n" + re.escape(end), text, re.DOTALL)
    return found.group(1) if found else ""


def pointwise_score(answer: str) -> int:
    return 1 + len(answer) % 5


class FakeJudge:
    def __init__(self, prefer: str = "first") -> None:
        self.prefer, self.requests, self.keys = prefer, [], []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                judge.keys.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                content = judge.verdict(body["messages"][-1]["content"])
                reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def verdict(self, prompt: str) -> str:
        if "Assistant's answer:" in prompt:
            answer = _section(prompt, "Assistant's answer:", "Rubric:")
            return f'Here: {{"score": {pointwise_score(answer)}, "reason": "length {len(answer)}"}}'
        first, second = _section(prompt, "Answer A:", "Answer B:"), _section(prompt, "Answer B:", "Which answer")
        if self.prefer == "first":
            winner = "A"
        else:
            winner = "tie" if len(first) == len(second) else "A" if len(first) > len(second) else "B"
        return json.dumps({"winner": winner, "reason": f"A has {len(first)}, B has {len(second)}"})

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
