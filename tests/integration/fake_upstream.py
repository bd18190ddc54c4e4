"""A vLLM-like OpenAI server for tests, on 127.0.0.1:0 in its own thread.

It answers ``/v1/chat/completions`` and ``/v1/completions`` the way vLLM 0.32 does
(../shared/notes/contracts.md §6): ``return_token_ids`` adds the top-level
``prompt_token_ids`` (chat; per choice for completions) and ``choices[].token_ids``;
``logprobs`` adds ``choices[].logprobs.content[].{token, logprob}`` (chat) or
``{tokens, token_logprobs}`` (completions); ``stream`` sends SSE chunks carrying the
delta's ``token_ids`` and logprobs, the first chunk per choice carrying the prompt
ids; ``n`` gives several choices. Answers are scripted so a tool-using agent can
run against it: a user turn with tools gets a tool call, a tool result gets
"The answer is ...". Every response is recorded in ``calls`` for assertions.

Token ids come from a pluggable tokenizer: UTF-8 bytes by default, or a real
Hugging Face tokenizer with a chat template (``HFTokenizer``), which is what the
check-tokens tests use. ``build_tiny_tokenizer`` trains one offline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t['function']['name'] }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 6 * 7? Use the calc tool, then answer with the number.",
    "The answer is 42. hello world, héllo ✓ tool_call calc expression",
    "system user assistant tool You are a careful calculator agent.",
]


def build_tiny_tokenizer(directory: Path) -> Path:
    """Train a byte-level BPE tokenizer offline and save it as a transformers model dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


class ByteTokenizer:
    """Token ids are the UTF-8 bytes; the prompt is the messages' JSON."""

    eos_id = 0

    def render(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        return list(json.dumps(messages, ensure_ascii=False).encode())

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", "replace")


class HFTokenizer:
    """A transformers tokenizer used the way vLLM uses it."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.eos_id = self.tokenizer.eos_token_id

    def render(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        messages = [dict(m) for m in messages]
        for message in messages:  # vLLM hands templates parsed tool-call arguments
            for call in message.get("tool_calls") or []:
                call["function"] = {**call["function"], "arguments": json.loads(call["function"]["arguments"])}
        return list(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _logprob(position: int, choice: int) -> float:
    return -round(0.05 * ((position * 7 + choice * 3) % 11 + 1), 4)


def scripted_reply(messages: list[dict], tools: list[dict] | None, choice: int) -> tuple[str, dict | None]:
    """(text, tool call or None): a tool call for a fresh question, the tool's result as the answer."""
    last = messages[-1] if messages else {"role": "user", "content": ""}
    content = last.get("content") if isinstance(last.get("content"), str) else ""
    suffix = f" (sample {choice})" if choice else ""
    if tools and last.get("role") == "user":
        match = re.search(r"(\d+)\s*\*\s*(\d+)", content)
        arguments = {"expression": f"{match[1]}*{match[2]}"} if match else {"input": content}
        name = tools[0]["function"]["name"]
        return "", {"id": f"call-{choice}", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)}}
    if last.get("role") == "tool":
        return f"The answer is {content}.{suffix}", None
    return f"Echo: {content}{suffix}", None


class FakeVllm:
    """The server. ``release`` (if given) holds every stream after its first chunk until set."""

    def __init__(self, tokenizer: Any = None, model: str = "tiny-model", policy_version: int | None = None,
                 chunk_delay_s: float = 0.0, release: threading.Event | None = None) -> None:
        self.tokenizer = tokenizer or ByteTokenizer()
        self.model, self.policy_version = model, policy_version
        self.chunk_delay_s, self.release = chunk_delay_s, release
        self.calls: list[dict] = []
        self.stream_finished_at: list[float] = []
        self.stream_bytes: list[bytearray] = []  # every SSE body exactly as written, per stream
        self.port = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeVllm":
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_get("/v1/models", self._models)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-vllm")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "FakeVllm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ handlers

    def _headers(self) -> dict[str, str]:
        return {"x-tracetrain-policy-version": str(self.policy_version)} if self.policy_version is not None else {}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _body(self, request: web.Request) -> dict | web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "invalid JSON", "type": "BadRequestError", "code": 400}},
                                     status=400)
        if body.get("model") not in (None, self.model):
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                "type": "NotFoundError", "param": "model", "code": 404}}, status=404)
        return body

    def _record(self, request: web.Request, body: dict, prompt_ids: list, outputs: list[dict]) -> None:
        self.calls.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.items()},
                           "request": body, "prompt_token_ids": prompt_ids, "choices": outputs})

    def _output(self, text: str, tool_call: dict | None, choice: int, max_tokens: int | None = None) -> dict:
        raw = f"<tool_call>{tool_call['function']['name']} {tool_call['function']['arguments']}</tool_call>" \
            if tool_call else text
        ids = self.tokenizer.encode(raw) + [self.tokenizer.eos_id]
        finish = "tool_calls" if tool_call else "stop"
        if max_tokens and not tool_call and len(ids) > max_tokens:  # cut off, no end-of-turn token
            ids, finish = ids[:max_tokens], "length"
            text = self.tokenizer.decode(ids)
        return {"text": text, "tool_call": tool_call, "token_ids": ids,
                "logprobs": [_logprob(k, choice) for k in range(len(ids))], "finish_reason": finish}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages, tools = body.get("messages") or [], body.get("tools")
        prompt_ids = self.tokenizer.render(messages, tools)
        outputs = [self._output(*scripted_reply(messages, tools, i), i, body.get("max_tokens"))
                   for i in range(body.get("n") or 1)]
        self._record(request, body, prompt_ids, outputs)
        if body.get("stream"):
            return await self._stream_chat(request, body, prompt_ids, outputs)
        ids, logprobs = bool(body.get("return_token_ids")), bool(body.get("logprobs"))
        choices = []
        for i, out in enumerate(outputs):
            choice = {"index": i, "message": {"role": "assistant", "content": out["text"] or None,
                                              "tool_calls": [out["tool_call"]] if out["tool_call"] else []},
                      "logprobs": self._chat_logprobs(out["token_ids"], out["logprobs"]) if logprobs else None,
                      "finish_reason": out["finish_reason"], "stop_reason": None}
            if ids:
                choice["token_ids"] = out["token_ids"]
            choices.append(choice)
        response = {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                    "model": self.model, "choices": choices, "usage": self._usage(prompt_ids, outputs)}
        if ids:
            response["prompt_token_ids"] = prompt_ids
        return web.json_response(response, headers=self._headers())

    def _chat_logprobs(self, ids: list[int], values: list[float]) -> dict:
        return {"content": [{"token": self.tokenizer.decode([t]), "logprob": v, "bytes": [], "top_logprobs": []}
                            for t, v in zip(ids, values)]}

    @staticmethod
    def _usage(prompt_ids: list, outputs: list[dict]) -> dict:
        completion = sum(len(o["token_ids"]) for o in outputs)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion}

    async def _send(self, response: web.StreamResponse, payload: Any, first: bool = False) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        raw = f"data: {data}\n\n".encode()
        self.stream_bytes[-1] += raw
        await response.write(raw)
        if first and self.release is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        elif self.chunk_delay_s:
            await asyncio.sleep(self.chunk_delay_s)

    async def _stream_chat(self, request: web.Request, body: dict, prompt_ids: list,
                           outputs: list[dict]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self._headers()})
        await response.prepare(request)
        self.stream_bytes.append(bytearray())
        ids, logprobs = bool(body.get("return_token_ids")), bool(body.get("logprobs"))
        cid, created = f"chatcmpl-{next(self._ids)}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model}
        for i, out in enumerate(outputs):
            first = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            if ids:
                first["prompt_token_ids"] = prompt_ids
            await self._send(response, first, first=(i == 0))
            for k, (delta, token) in enumerate(zip(self._deltas(out), out["token_ids"])):
                last = k == len(out["token_ids"]) - 1
                choice = {"index": i, "delta": delta, "finish_reason": out["finish_reason"] if last else None,
                          "logprobs": self._chat_logprobs([token], [out["logprobs"][k]]) if logprobs else None}
                if ids:
                    choice["token_ids"] = [token]
                await self._send(response, {**head, "choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await self._send(response, {**head, "choices": [], "usage": self._usage(prompt_ids, outputs)})
        await self._send(response, "[DONE]")
        self.stream_finished_at.append(time.monotonic())
        await response.write_eof()
        return response

    def _deltas(self, out: dict) -> list[dict]:
        """One delta per output token, whose pieces concatenate to the text or tool call."""
        n = len(out["token_ids"])
        if out["tool_call"]:
            arguments = out["tool_call"]["function"]["arguments"]
            step = -(-len(arguments) // max(n - 1, 1))
            pieces = [arguments[j * step:(j + 1) * step] for j in range(n - 1)]
            head = {"index": 0, "id": out["tool_call"]["id"], "type": "function",
                    "function": {"name": out["tool_call"]["function"]["name"], "arguments": ""}}
            return [{"tool_calls": [head]}] + [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                                               for p in pieces]
        pending: list[int] = []
        deltas = []
        for k, token in enumerate(out["token_ids"]):
            pending.append(token)
            text = self.tokenizer.decode(pending)
            if text.endswith("\ufffd") and k < n - 1:  # half a UTF-8 character: hold it back, as vLLM does
                deltas.append({"content": ""})
                continue
            deltas.append({"content": text})
            pending = []
        return deltas

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
        n = body.get("n") or 1
        prompt_ids = [self.tokenizer.encode(p, special=True) for p in prompts]
        outputs = [self._output(f" completion {j}", None, j, body.get("max_tokens")) for j in range(len(prompts) * n)]
        self._record(request, body, prompt_ids, outputs)
        ids, logprobs = bool(body.get("return_token_ids")), body.get("logprobs") is not None
        if body.get("stream"):
            return await self._stream_completions(request, prompt_ids, outputs, n, ids, logprobs)
        choices = []
        for j, out in enumerate(outputs):
            choice = {"index": j, "text": out["text"], "finish_reason": out["finish_reason"],
                      "logprobs": self._completion_logprobs(out["token_ids"], out["logprobs"]) if logprobs else None}
            if ids:
                choice.update(prompt_token_ids=prompt_ids[j // n], token_ids=out["token_ids"])
            choices.append(choice)
        return web.json_response({"id": f"cmpl-{next(self._ids)}", "object": "text_completion",
                                  "created": int(time.time()), "model": self.model, "choices": choices,
                                  "usage": self._usage(sum(prompt_ids, []), outputs)}, headers=self._headers())

    def _completion_logprobs(self, ids: list[int], values: list[float]) -> dict:
        return {"tokens": [self.tokenizer.decode([t]) for t in ids], "token_logprobs": values,
                "top_logprobs": [{} for _ in ids], "text_offset": list(range(len(ids)))}

    async def _stream_completions(self, request: web.Request, prompt_ids: list, outputs: list[dict], n: int,
                                  ids: bool, logprobs: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self._headers()})
        await response.prepare(request)
        self.stream_bytes.append(bytearray())
        head = {"id": f"cmpl-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}
        for j, out in enumerate(outputs):
            for k, (delta, token) in enumerate(zip(self._deltas(out), out["token_ids"])):
                choice = {"index": j, "text": delta["content"],
                          "finish_reason": out["finish_reason"] if k == len(out["token_ids"]) - 1 else None,
                          "logprobs": self._completion_logprobs([token], [out["logprobs"][k]]) if logprobs else None}
                if ids:
                    choice["token_ids"] = [token]
                    if k == 0:
                        choice["prompt_token_ids"] = prompt_ids[j // n]
                await self._send(response, {**head, "choices": [choice]}, first=(j == 0 and k == 0))
        await self._send(response, "[DONE]")
        self.stream_finished_at.append(time.monotonic())
        await response.write_eof()
        return response
