"""What `tracetrain proxy` records about one LLM call. Pure data, no I/O.

The proxy asks vLLM for what training needs (``return_token_ids``, ``logprobs``),
then turns the request and the response (whole JSON, or SSE chunks as they pass)
into span attributes: OTel GenAI ``gen_ai.*`` keys plus tracetrain's token ids,
logprobs and policy version (``instrumentation/semconv.py``).

Choices follow the same contract as the in-process capture (docs/capture.md): one
span per model call, choice 0 in ``tracetrain.output.token_ids``/``.logprobs``,
choice ``i >= 1`` in ``tracetrain.output.choice.<i>.token_ids``/``.logprobs``,
``gen_ai.output.messages`` with one message per choice. A completions request
with several prompts is several model calls (each prompt has its own prompt ids),
so it leaves one span per prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as otel_gen_ai

from tracetrain.instrumentation import semconv as sc

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
CAPTURED_OPERATIONS = {CHAT_PATH: "chat", COMPLETIONS_PATH: "text_completion"}
PROVIDER = "vllm"

# Request headers a caller may set instead of (or besides) W3C baggage, for
# clients that cannot run an OTel SDK at all (curl, a shell script).
CONTEXT_HEADERS = {
    "x-tracetrain-episode-id": sc.EPISODE_ID,
    "x-tracetrain-task-id": sc.TASK_ID,
    "x-tracetrain-rollout-id": sc.ROLLOUT_ID,
    "x-tracetrain-agent-name": sc.GEN_AI_AGENT_NAME,
}
# Baggage keys read from the caller's W3C ``baggage`` header: the semconv keys.
CONTEXT_BAGGAGE_KEYS = (sc.EPISODE_ID, sc.TASK_ID, sc.ROLLOUT_ID, sc.GEN_AI_AGENT_NAME, sc.GEN_AI_CONVERSATION_ID)

# Values of sc.TOKEN_IDS_UNAVAILABLE_REASON, as the in-process capture uses them.
REASON_DISABLED = "capture_disabled"  # here: the caller sent return_token_ids: false
REASON_NOT_IN_RESPONSE = "not_in_response"  # asked, not returned (or no response at all)
REASON_ERROR = "capture_error"  # the proxy could not read the response; it was relayed anyway

# Request parameters recorded as OTel GenAI request attributes (float/int as the spec types them).
_REQUEST_PARAMS = {
    "temperature": (sc.GEN_AI_REQUEST_TEMPERATURE, float),
    "top_p": (otel_gen_ai.GEN_AI_REQUEST_TOP_P, float),
    "max_tokens": (sc.GEN_AI_REQUEST_MAX_TOKENS, int),
    "max_completion_tokens": (sc.GEN_AI_REQUEST_MAX_TOKENS, int),
    "seed": (otel_gen_ai.GEN_AI_REQUEST_SEED, int),
    "n": (sc.GEN_AI_REQUEST_CHOICE_COUNT, int),
}


def augment_request(operation: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request with token ids and logprobs asked for, unless the caller decided.

    A caller's explicit value (even ``false``) wins: the proxy records what it can
    and never overrides a choice. ``null`` counts as unset.
    """
    out = dict(body)
    if out.get("return_token_ids") is None:
        out["return_token_ids"] = True
    if out.get("logprobs") is None:
        # chat takes a bool; completions an int (how many top alternatives, 1 is the cheapest
        # setting that still returns the sampled token's own logprob)
        out["logprobs"] = True if operation == "chat" else 1
    return out


# ---------------------------------------------------------------- messages: OpenAI -> OTel parts


def _parse_arguments(arguments: Any) -> Any:
    """Tool-call arguments as a JSON value: vLLM hands chat templates a dict, so store one."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for item in content if isinstance(content, list) else [content]:
        if isinstance(item, dict) and item.get("type") == "text":
            parts.append({"type": "text", "content": item.get("text", "")})
        elif isinstance(item, dict) and item.get("type") == "image_url":
            url = item.get("image_url", {})
            parts.append({"type": "uri", "modality": "image", "uri": url.get("url") if isinstance(url, dict) else url})
        else:  # keep what we do not model rather than drop it
            parts.append({"type": str(item.get("type", "unknown")) if isinstance(item, dict) else "unknown",
                          "content": item})
    return parts


def _tool_call_parts(tool_calls: Any) -> list[dict[str, Any]]:
    parts = []
    for call in tool_calls or []:
        function = call.get("function") or {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                      "arguments": _parse_arguments(function.get("arguments"))})
    return parts


def chat_message_to_otel(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message as an OTel GenAI message ``{role, parts[, name]}``."""
    role = message.get("role", "user")
    parts: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        parts.append({"type": "reasoning", "content": reasoning})
    if role == "tool":
        parts.append({"type": "tool_call_response", "id": message.get("tool_call_id"),
                      "response": message.get("content")})
    else:
        parts.extend(_content_parts(message.get("content")))
    parts.extend(_tool_call_parts(message.get("tool_calls")))
    out: dict[str, Any] = {"role": role, "parts": parts}
    if message.get("name"):
        out["name"] = message["name"]
    return out


def tool_definitions_to_otel(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools`` as OTel ``gen_ai.tool.definitions`` (the function fields, flattened)."""
    out = []
    for tool in tools or []:
        function = tool.get("function") or {}
        out.append({"type": tool.get("type", "function"), **function})
    return out


def completion_prompts(prompt: Any) -> list[str | None]:
    """The text of each prompt of a completions request (None for a token-id prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [None]
    if isinstance(prompt, list):
        return [p if isinstance(p, str) else None for p in prompt] or [None]
    return [None]


# ---------------------------------------------------------------- one choice, accumulated


@dataclass
class ChoiceRecord:
    """Everything learned about one choice, from a whole response or from SSE chunks."""

    index: int
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None

    def add_token_ids(self, ids: Any) -> None:
        if isinstance(ids, list):  # extended in place: a stream adds one id per chunk
            if self.token_ids is None:
                self.token_ids = []
            self.token_ids.extend(ids)  # JSON ints already; the exporter checks the type once, vectorized

    def add_logprobs(self, values: list[Any]) -> None:
        if self.logprobs is None:
            self.logprobs = []
        # JSON has no -inf (vLLM clamps it to -9999.0); a null stays visible as NaN
        self.logprobs.extend(float(v) if isinstance(v, (int, float)) else math.nan for v in values)

    def add_tool_call_delta(self, delta: dict[str, Any]) -> None:
        slot = self.tool_calls.setdefault(int(delta.get("index", len(self.tool_calls))),
                                          {"id": None, "name": None, "arguments": ""})
        function = delta.get("function") or {}
        slot["id"] = delta.get("id") or slot["id"]
        slot["name"] = function.get("name") or slot["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            slot["arguments"] += arguments
        elif arguments is not None:
            slot["arguments"] = arguments

    def output_message(self) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if "".join(self.reasoning):
            parts.append({"type": "reasoning", "content": "".join(self.reasoning)})
        text = "".join(self.text)
        if text:  # a stream's first delta is an empty string even for a pure tool call
            parts.append({"type": "text", "content": text})
        for _, call in sorted(self.tool_calls.items()):
            parts.append({"type": "tool_call", "id": call["id"], "name": call["name"],
                          "arguments": _parse_arguments(call["arguments"])})
        return {"role": "assistant", "parts": parts, "finish_reason": self.finish_reason or "unknown"}


def _logprob_values(logprobs: Any) -> list[Any] | None:
    """Sampled-token logprobs from a chat (``content[].logprob``) or completions block."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        return [entry.get("logprob") if isinstance(entry, dict) else None for entry in logprobs["content"]]
    if isinstance(logprobs.get("token_logprobs"), list):
        return logprobs["token_logprobs"]
    return None


class CallRecord:
    """One captured call: built from the request, fed the response, read as span attributes."""

    def __init__(self, operation: str, request: dict[str, Any], context: dict[str, str]) -> None:
        self.operation = operation
        self.request = request
        self.context = context  # episode/task/... ids from headers and baggage
        self.response_model: str | None = None
        self.response_id: str | None = None
        self.usage: dict[str, Any] = {}
        self.prompt_token_ids: list[int] | None = None
        self.choices: dict[int, ChoiceRecord] = {}
        self.policy_version: int | None = None
        self.error: str | None = None

    @property
    def request_model(self) -> str | None:
        model = self.request.get("model")
        return model if isinstance(model, str) else None

    def set_policy_version(self, header_value: str | None) -> None:
        if header_value is not None and header_value.strip().lstrip("-").isdigit():
            self.policy_version = int(header_value.strip())

    def _choice(self, index: Any) -> ChoiceRecord:
        index = int(index) if isinstance(index, int) else len(self.choices)
        return self.choices.setdefault(index, ChoiceRecord(index))

    def _top_level(self, body: dict[str, Any]) -> None:
        self.response_model = body.get("model") or self.response_model
        self.response_id = body.get("id") or self.response_id
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        if isinstance(body.get("prompt_token_ids"), list):
            self.prompt_token_ids = body["prompt_token_ids"]
        if isinstance(body.get("error"), dict):  # vLLM reports mid-stream failures as an event
            self.error = str(body["error"].get("message") or body["error"])

    def add_response(self, body: dict[str, Any]) -> None:
        """A whole (non-streamed) response body."""
        self._top_level(body)
        for raw in body.get("choices") or []:
            choice = self._choice(raw.get("index"))
            message = raw.get("message") or {}
            content = message.get("content") if self.operation == "chat" else raw.get("text")
            if isinstance(content, str):
                choice.text.append(content)
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if isinstance(reasoning, str):
                choice.reasoning.append(reasoning)
            for position, call in enumerate(message.get("tool_calls") or []):
                choice.add_tool_call_delta({"index": position, **call})
            self._choice_ids(choice, raw)
            choice.finish_reason = raw.get("finish_reason")

    def add_chunk(self, chunk: dict[str, Any]) -> None:
        """One SSE ``data:`` object of a streamed response."""
        self._top_level(chunk)
        for raw in chunk.get("choices") or []:
            choice = self._choice(raw.get("index"))
            delta = raw.get("delta") or {}
            text = delta.get("content") if self.operation == "chat" else raw.get("text")
            if isinstance(text, str):
                choice.text.append(text)
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str):
                choice.reasoning.append(reasoning)
            for call in delta.get("tool_calls") or []:
                choice.add_tool_call_delta(call)
            self._choice_ids(choice, raw)
            choice.finish_reason = raw.get("finish_reason") or choice.finish_reason

    @staticmethod
    def _choice_ids(choice: ChoiceRecord, raw: dict[str, Any]) -> None:
        choice.add_token_ids(raw.get("token_ids"))
        if isinstance(raw.get("prompt_token_ids"), list):  # completions: per choice
            choice.prompt_token_ids = raw["prompt_token_ids"]
        values = _logprob_values(raw.get("logprobs"))
        if values is not None:
            choice.add_logprobs(values)

    # ------------------------------------------------------------ span attributes

    @property
    def choices_per_prompt(self) -> int:
        n = self.request.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def groups(self) -> list[list[ChoiceRecord]]:
        """Choices per model call: all of them for chat, per prompt for completions.

        vLLM numbers completions choices prompt-major (prompt ``i`` has choices
        ``i*n .. i*n+n-1``)."""
        choices = [self.choices[i] for i in sorted(self.choices)]
        if self.operation == "chat" or len(choices) <= self.choices_per_prompt:
            return [choices]
        by_prompt: dict[int, list[ChoiceRecord]] = {}
        for choice in choices:
            by_prompt.setdefault(choice.index // self.choices_per_prompt, []).append(choice)
        return [by_prompt[k] for k in sorted(by_prompt)]

    def input_messages(self, prompt_index: int) -> list[dict[str, Any]]:
        if self.operation == "chat":
            return [chat_message_to_otel(m) for m in self.request.get("messages") or [] if isinstance(m, dict)]
        prompts = completion_prompts(self.request.get("prompt"))
        text = prompts[min(prompt_index, len(prompts) - 1)]
        return [{"role": "user", "parts": [{"type": "text", "content": text}] if text is not None else []}]

    def request_attributes(self, upstream_url: str | None = None) -> dict[str, Any]:
        """What is known before the response: used to name and start the span."""
        attributes: dict[str, Any] = {sc.GEN_AI_OPERATION_NAME: self.operation, sc.GEN_AI_PROVIDER_NAME: PROVIDER}
        if self.request_model:
            attributes[sc.GEN_AI_REQUEST_MODEL] = self.request_model
        for param, (key, kind) in _REQUEST_PARAMS.items():
            value = self.request.get(param)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[key] = kind(value)
        if upstream_url:
            url = urlsplit(upstream_url)
            attributes.update({k: v for k, v in ((sc.SERVER_ADDRESS, url.hostname), (sc.SERVER_PORT, url.port))
                               if v is not None})
        if self.operation == "chat" and self.request.get("tools"):
            attributes[otel_gen_ai.GEN_AI_TOOL_DEFINITIONS] = json.dumps(
                tool_definitions_to_otel(self.request["tools"]), ensure_ascii=False)
        attributes.update(self.context)
        return attributes

    def span_attributes(self, capture_failed: bool = False) -> list[dict[str, Any]]:
        """Response attributes, one dict per model call (at least one: a failed call still leaves a span)."""
        groups = self.groups() if self.choices else [[]]
        out = []
        for prompt_index, group in enumerate(groups):
            attributes = {k: v for k, v in ((sc.GEN_AI_RESPONSE_MODEL, self.response_model),
                                            (sc.GEN_AI_RESPONSE_ID, self.response_id),
                                            (sc.POLICY_VERSION, self.policy_version)) if v is not None}
            attributes[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(self.input_messages(prompt_index), ensure_ascii=False)
            if group:
                attributes[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps([c.output_message() for c in group],
                                                                   ensure_ascii=False)
                attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = [c.finish_reason or "" for c in group]
            attributes.update(self._token_attributes(group, single_call=len(groups) == 1))
            if sc.OUTPUT_TOKEN_IDS not in attributes:
                disabled = self.request.get("return_token_ids") is False
                attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] = (
                    REASON_DISABLED if disabled else REASON_ERROR if capture_failed else REASON_NOT_IN_RESPONSE)
            out.append(attributes)
        return out

    def _token_attributes(self, group: list[ChoiceRecord], single_call: bool) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        first = group[0] if group else ChoiceRecord(0)
        prompt_ids = first.prompt_token_ids if first.prompt_token_ids is not None else self.prompt_token_ids
        if prompt_ids is not None:
            attributes[sc.INPUT_TOKEN_IDS] = prompt_ids
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = len(prompt_ids)
        elif single_call and isinstance(self.usage.get("prompt_tokens"), int):
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = self.usage["prompt_tokens"]
        for position, choice in enumerate(group):
            if choice.token_ids is None:
                continue
            ids_key, logprobs_key = (sc.OUTPUT_TOKEN_IDS, sc.OUTPUT_LOGPROBS) if position == 0 else (
                sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=position),
                sc.OUTPUT_CHOICE_LOGPROBS_TEMPLATE.format(index=position))
            attributes[ids_key] = choice.token_ids
            # the contract is one logprob per id; a partial list would misalign every token after it
            if choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids):
                attributes[logprobs_key] = choice.logprobs
        if len(group) > 1:
            attributes[sc.OUTPUT_CHOICE_COUNT] = len(group)
        counted = [len(c.token_ids) for c in group if c.token_ids is not None]
        if single_call and isinstance(self.usage.get("completion_tokens"), int):
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = self.usage["completion_tokens"]
        elif counted and len(counted) == len(group):
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = sum(counted)
        return attributes


# ---------------------------------------------------------------- SSE


class SseParser:
    """Splits a byte stream into SSE ``data:`` payloads, whatever the chunk boundaries."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        # normalise CRLF after joining, so a CR and LF split across two reads still pair up
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        events = []
        while b"\n\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n\n", 1)
            lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
            if lines:
                events.append(b"\n".join(lines).decode("utf-8", "replace"))
        return events
