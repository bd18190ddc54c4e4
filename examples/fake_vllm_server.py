"""A stdlib OpenAI-compatible server that answers like vLLM, for tests and demos.

It speaks enough of vLLM's OpenAI API (``/v1/chat/completions`` plain and SSE
streaming, ``/v1/completions``, ``/v1/models``) for an agent to run against it and
for a trainer-side capture to be checked exactly:

* ``return_token_ids: true`` adds the top-level ``prompt_token_ids`` and
  ``choices[].token_ids`` (on ``/v1/completions``: both per choice), as vLLM does;
* ``logprobs: true`` adds ``choices[].logprobs.content[]`` (one entry per token id);
* ``n > 1`` gives each choice its own ids and logprobs;
* when the last user message asks for a calculation and tools are offered, the
  model calls the first tool with ``{"expression": ...}``; after a tool result it
  answers ``The answer is <result>.``;
* ``--openai-strict`` behaves like the hosted OpenAI API instead: unknown request
  fields (``return_token_ids``...) are refused with 400 and no token ids are returned.

Its "tokenizer" is byte level: a token is one UTF-8 byte (id = byte + 3), ids 1 and
2 are ``<|im_start|>`` / ``<|im_end|>``, and every reply ends with ``<|im_end|>``.
Logprobs are a fixed function of (token, position, choice), so streamed and
non-streamed answers are identical, as on vLLM.

    python examples/fake_vllm_server.py --port 8000        # prints "listening on http://127.0.0.1:8000"

Used in-process by the tests: ``FakeVllmServer(port=0).start()``; ``.requests`` and
``.responses`` record what was asked and what was answered.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IM_START, IM_END = 1, 2
TOKEN_OFFSET = 3
STREAM_CHARS_PER_CHUNK = 3
POLICY_VERSION_HEADER = "x-tracetrain-policy-version"
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
OPENAI_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
})
EXPRESSION = re.compile(r"[-+*/().\d\s]*\d\s*[-+*/]\s*[-+*/().\d\s]*\d[-+*/().\d\s]*")


def encode(text: str) -> list[int]:
    """Byte-level token ids of ``text``."""
    return [b + TOKEN_OFFSET for b in text.encode()]


def token_text(token_id: int) -> str:
    if token_id == IM_END:
        return "<|im_end|>"
    return bytes([token_id - TOKEN_OFFSET]).decode("utf-8", errors="replace")


def logprob(token_id: int, position: int, choice_index: int) -> float:
    """A deterministic, plausible behaviour logprob in [-1.96, -0.02]."""
    return -(((token_id * 31 + position * 17 + choice_index * 7) % 97) + 1) / 50.0


def _text_of(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def render_prompt(messages: list[dict], tools: list[dict] | None) -> list[int]:
    """ChatML-like prompt ids, ending with the assistant header (add_generation_prompt)."""
    ids: list[int] = []
    if tools:
        names = ",".join(t.get("function", {}).get("name", "?") for t in tools)
        ids += [IM_START] + encode(f"system\n# tools: {names}") + [IM_END] + encode("\n")
    for message in messages:
        text = _text_of(message.get("content"))
        for call in message.get("tool_calls") or []:
            text += f"<tool_call>{json.dumps(call.get('function', {}))}</tool_call>"
        ids += [IM_START] + encode(f"{message.get('role', 'user')}\n{text}") + [IM_END] + encode("\n")
    return ids + [IM_START] + encode("assistant\n")


def decide_reply(messages: list[dict], tools: list[dict] | None, choice_index: int) -> dict:
    """What the fake model says: ``{"text": str}`` or ``{"tool": name, "arguments": dict}``."""
    last = messages[-1] if messages else {"role": "user", "content": ""}
    if last.get("role") == "tool":
        return {"text": f"The answer is {_text_of(last.get('content')).strip()}."}
    user_text = _text_of(last.get("content"))
    match = EXPRESSION.search(user_text)
    if tools and match:
        name = tools[0].get("function", {}).get("name", "calc")
        return {"tool": name, "arguments": {"expression": match.group().strip()}}
    suffix = f" (sample {choice_index})" if choice_index else ""
    return {"text": f"You said: {user_text[:40]}{suffix}"}


def _generated_ids(reply: dict) -> list[int]:
    if "tool" in reply:
        call = json.dumps({"name": reply["tool"], "arguments": reply["arguments"]})
        return encode(f"<tool_call>{call}</tool_call>") + [IM_END]
    return encode(reply["text"]) + [IM_END]


def _logprobs_content(ids: list[int], choice_index: int, top_logprobs: int, start: int = 0) -> list[dict]:
    entries = []
    for offset, token_id in enumerate(ids):
        value = logprob(token_id, start + offset, choice_index)
        token = {"token": token_text(token_id), "logprob": value, "bytes": [max(token_id - TOKEN_OFFSET, 0)]}
        entries.append({**token, "top_logprobs": [token][:top_logprobs]})
    return entries


class Completion:
    """One chat request's answer, computed once and rendered plain or streamed."""

    ids = itertools.count(1)

    def __init__(self, body: dict, vllm: bool):
        self.body, self.vllm = body, vllm
        self.model = body.get("model", "tiny")
        self.id = f"chatcmpl-fake-{next(Completion.ids)}"
        self.created = int(time.time())
        self.prompt_ids = render_prompt(body.get("messages", []), body.get("tools"))
        self.want_ids = vllm and bool(body.get("return_token_ids"))
        self.want_logprobs = bool(body.get("logprobs"))
        self.top_logprobs = int(body.get("top_logprobs") or 0)
        self.choices = []
        for index in range(int(body.get("n") or 1)):
            reply = decide_reply(body.get("messages", []), body.get("tools"), index)
            self.choices.append({"index": index, "reply": reply, "ids": _generated_ids(reply),
                                 "call_id": f"call_{self.id[-6:]}_{index}"})

    def usage(self) -> dict:
        completion_tokens = sum(len(c["ids"]) for c in self.choices)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion_tokens,
                "total_tokens": len(self.prompt_ids) + completion_tokens}

    def _message(self, choice: dict) -> dict:
        reply = choice["reply"]
        if "tool" in reply:
            return {"role": "assistant", "content": None, "tool_calls": [{
                "id": choice["call_id"], "type": "function",
                "function": {"name": reply["tool"], "arguments": json.dumps(reply["arguments"])}}]}
        return {"role": "assistant", "content": reply["text"]}

    @staticmethod
    def finish_reason(choice: dict) -> str:
        return "tool_calls" if "tool" in choice["reply"] else "stop"

    def plain(self) -> dict:
        """The non-streaming response body."""
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}
        for choice in self.choices:
            item = {"index": choice["index"], "message": self._message(choice),
                    "finish_reason": self.finish_reason(choice),
                    "logprobs": ({"content": _logprobs_content(choice["ids"], choice["index"], self.top_logprobs)}
                                 if self.want_logprobs else None)}
            if self.want_ids:
                item["token_ids"] = choice["ids"]
            body["choices"].append(item)
        if self.want_ids:
            body["prompt_token_ids"] = self.prompt_ids
        return body

    def chunks(self):
        """The streamed chunks (dicts), in order, as vLLM sends them."""
        base = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        for choice in self.choices:
            first = {**base, "choices": [{"index": choice["index"], "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            if self.want_ids:
                first["prompt_token_ids"] = self.prompt_ids
            yield first
        for choice in self.choices:
            yield from self._choice_chunks(base, choice)
        if (self.body.get("stream_options") or {}).get("include_usage"):
            yield {**base, "choices": [], "usage": self.usage()}

    def _choice_chunks(self, base: dict, choice: dict):
        ids, reply, index = choice["ids"], choice["reply"], choice["index"]
        text = reply.get("text", "")
        pieces, position = [], 0
        for start in range(0, len(text), STREAM_CHARS_PER_CHUNK):  # split on characters, never inside one
            piece = text[start:start + STREAM_CHARS_PER_CHUNK]
            pieces.append((piece, len(piece.encode())))
        if "tool" in reply:
            pieces = [("", len(ids) - 1)]
        pieces.append(("", 1))  # <|im_end|>
        for piece, n_tokens in pieces:
            piece_ids = ids[position:position + n_tokens]
            delta = {"content": piece} if piece else {}
            is_last = position + n_tokens == len(ids)
            if is_last and "tool" in reply:
                delta = {"tool_calls": [{"index": 0, "id": choice["call_id"], "type": "function", "function": {
                    "name": reply["tool"], "arguments": json.dumps(reply["arguments"])}}]}
            item = {"index": index, "delta": delta, "finish_reason": self.finish_reason(choice) if is_last else None,
                    "logprobs": ({"content": _logprobs_content(piece_ids, index, self.top_logprobs, position)}
                                 if self.want_logprobs else None)}
            if self.want_ids:
                item["token_ids"] = piece_ids
            position += n_tokens
            yield {**base, "choices": [item]}

    def record(self) -> dict:
        """What a capture must find: ids and logprobs per choice (whatever was returned)."""
        return {"id": self.id, "model": self.model, "prompt_token_ids": self.prompt_ids if self.want_ids else None,
                "choices": [{"token_ids": c["ids"] if self.want_ids else None,
                             "logprobs": ([logprob(t, i, c["index"]) for i, t in enumerate(c["ids"])]
                                          if self.want_logprobs else None)} for c in self.choices]}


def legacy_completion(body: dict, vllm: bool) -> dict:
    """``/v1/completions`` (non-streaming): ids per choice, OpenAI-style integer logprobs."""
    prompt = body.get("prompt", "")
    prompt = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else prompt
    prompt_ids = prompt if isinstance(prompt, list) else encode(str(prompt))
    choices = []
    for index in range(int(body.get("n") or 1)):
        text = " fake completion" + (f" {index}" if index else "")
        ids = encode(text) + [IM_END]
        choice = {"index": index, "text": text, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {"tokens": [token_text(t) for t in ids],
                                  "token_logprobs": [logprob(t, i, index) for i, t in enumerate(ids)],
                                  "top_logprobs": None, "text_offset": list(range(len(ids)))}
        if vllm and body.get("return_token_ids"):
            choice["prompt_token_ids"], choice["token_ids"] = prompt_ids, ids
        choices.append(choice)
    return {"id": f"cmpl-fake-{next(Completion.ids)}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", "tiny"), "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": sum(len(encode(c["text"])) + 1
                                                                                 for c in choices)}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall
    server: "_HttpServer"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature; quiet by default
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._extra_headers()
        self.end_headers()
        self.wfile.write(data)

    def _extra_headers(self) -> None:
        if self.server.owner.policy_version is not None:
            self.send_header(POLICY_VERSION_HEADER, str(self.server.owner.policy_version))

    def do_GET(self):  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") == "/v1/models":
            models = [{"id": name, "object": "model", "owned_by": "vllm"} for name in self.server.owner.model_names]
            self._send_json(200, {"object": "list", "data": models})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self):  # noqa: N802 - stdlib naming
        owner = self.server.owner
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except json.JSONDecodeError as exc:
            self._send_json(400, {"error": {"message": f"invalid JSON: {exc}", "type": "invalid_request_error"}})
            return
        path = self.path.split("?")[0].rstrip("/")
        with owner.lock:
            owner.requests.append({"path": path, "body": body, "headers": dict(self.headers)})
        allowed = {"/v1/chat/completions": OPENAI_CHAT_FIELDS, "/v1/completions": OPENAI_COMPLETION_FIELDS}.get(path)
        if allowed is None:
            self._send_json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
            return
        unknown = sorted(set(body) - allowed)
        if owner.openai_strict and unknown:  # the hosted API refuses fields it does not know
            self._send_json(400, {"error": {"message": f"Unrecognized request argument supplied: {unknown[0]}",
                                            "type": "invalid_request_error", "param": None, "code": None}})
            return
        if path == "/v1/completions":
            self._send_json(200, legacy_completion(body, vllm=not owner.openai_strict))
            return
        completion = Completion(body, vllm=not owner.openai_strict)
        with owner.lock:
            owner.responses.append(completion.record())
        if body.get("stream"):
            self._stream(completion)
        else:
            self._send_json(200, completion.plain())

    def _stream(self, completion: Completion) -> None:
        """Server-sent events with HTTP/1.1 chunked transfer encoding."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self._extra_headers()
        self.end_headers()
        for chunk in completion.chunks():
            self._write_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FakeVllmServer"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client went away
            super().handle_error(request, client_address)


class FakeVllmServer:
    """The server, startable in a thread (tests) or in the foreground (``main``)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", openai_strict: bool = False,
                 policy_version: int | None = None, model_names: tuple[str, ...] = ("tiny",), verbose: bool = False):
        self.openai_strict, self.policy_version, self.verbose = openai_strict, policy_version, verbose
        self.model_names = model_names
        self.requests: list[dict] = []
        self.responses: list[dict] = []
        self.lock = threading.Lock()
        self._http = _HttpServer((host, port), _Handler)
        self._http.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeVllmServer":
        self._thread = threading.Thread(target=self._http.serve_forever, name="fake-vllm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def serve_forever(self) -> None:
        self._http.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--openai-strict", action="store_true",
                        help="behave like the hosted OpenAI API: refuse unknown fields, never return token ids")
    parser.add_argument("--policy-version", type=int, default=None,
                        help=f"send this integer in the {POLICY_VERSION_HEADER} response header")
    parser.add_argument("--model", action="append", dest="models", help="model names listed by /v1/models")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args()
    server = FakeVllmServer(args.port, args.host, args.openai_strict, args.policy_version,
                            tuple(args.models or ["tiny"]), args.verbose)
    print(f"listening on http://{args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
