"""What `tracetrain proxy` records about one LLM call. Pure data, no I/O.

The proxy asks vLLM for what training needs (``return_token_ids``, ``logprobs``),
then turns the request and the response (whole JSON, or SSE chunks as they pass)
into span attributes: OTel GenAI ``gen_ai.*`` keys plus tracetrain's token ids,
logprobs and policy version (``instrumentation/semconv.py``).

One span per choice: with ``n > 1`` (or several prompts in one completions
request) every sampled completion is its own trainable sample, so each gets its
own ``llm_calls`` row with the shared prompt ids and its own response ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as otel_gen_ai

from tracetrain.instrumentation import semconv as sc

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
CAPTURED_OPERATIONS = {CHAT_PATH: "chat", COMPLETIONS_PATH: "text_completion"}
PROVIDER = "vllm"

POLICY_VERSION_HEADER = "x-tracetrain-policy-version"
"""Response header (from the serving side) naming the weights that answered."""

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

CHOICE_INDEX = "tracetrain.choice.index"
"""int: which choice of a multi-choice response a span records (only when there are several).
NOTE: belongs in instrumentation/semconv.py; kept here until that contract adds it."""

# Request parameters recorded as OTel GenAI request attributes.
_REQUEST_PARAMS = {
    "temperature": otel_gen_ai.GEN_AI_REQUEST_TEMPERATURE,
    "top_p": otel_gen_ai.GEN_AI_REQUEST_TOP_P,
    "max_tokens": otel_gen_ai.GEN_AI_REQUEST_MAX_TOKENS,
    "max_completion_tokens": otel_gen_ai.GEN_AI_REQUEST_MAX_TOKENS,
    "seed": otel_gen_ai.GEN_AI_REQUEST_SEED,
    "n": otel_gen_ai.GEN_AI_REQUEST_CHOICE_COUNT,
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
        if isinstance(ids, list):
            self.token_ids = (self.token_ids or []) + [int(i) for i in ids]

    def add_logprobs(self, values: list[Any]) -> None:
        # JSON has no -inf (vLLM clamps it to -9999.0); a null stays visible as NaN
        floats = [float(v) if isinstance(v, (int, float)) else math.nan for v in values]
        self.logprobs = (self.logprobs or []) + floats

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
        if self.reasoning:
            parts.append({"type": "reasoning", "content": "".join(self.reasoning)})
        if self.text:
            parts.append({"type": "text", "content": "".join(self.text)})
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
            self.prompt_token_ids = [int(i) for i in body["prompt_token_ids"]]
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
            choice.prompt_token_ids = [int(i) for i in raw["prompt_token_ids"]]
        values = _logprob_values(raw.get("logprobs"))
        if values is not None:
            choice.add_logprobs(values)

    # ------------------------------------------------------------ span attributes

    def input_messages(self, choice_index: int) -> list[dict[str, Any]]:
        if self.operation == "chat":
            return [chat_message_to_otel(m) for m in self.request.get("messages") or [] if isinstance(m, dict)]
        prompts = completion_prompts(self.request.get("prompt"))
        n = self.request.get("n") if isinstance(self.request.get("n"), int) and self.request["n"] > 0 else 1
        text = prompts[min(choice_index // n, len(prompts) - 1)]  # vLLM orders choices prompt-major
        return [{"role": "user", "parts": [{"type": "text", "content": text}] if text is not None else []}]

    def request_attributes(self) -> dict[str, Any]:
        """What is known before the response: used to name and start the span."""
        attributes: dict[str, Any] = {sc.GEN_AI_OPERATION_NAME: self.operation, sc.GEN_AI_PROVIDER_NAME: PROVIDER}
        if self.request_model:
            attributes[sc.GEN_AI_REQUEST_MODEL] = self.request_model
        for param, key in _REQUEST_PARAMS.items():
            value = self.request.get(param)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (param != "n" or value > 1):
                attributes[key] = value
        attributes.update(self.context)
        return attributes

    def span_attributes(self) -> list[dict[str, Any]]:
        """One attribute dict per choice (at least one, so a failed call still leaves a span)."""
        choices = [self.choices[i] for i in sorted(self.choices)] or [ChoiceRecord(0)]
        return [self._choice_attributes(choice, several=len(choices) > 1) for choice in choices]

    def _choice_attributes(self, choice: ChoiceRecord, several: bool) -> dict[str, Any]:
        attributes = self.request_attributes()
        optional = {
            sc.GEN_AI_RESPONSE_MODEL: self.response_model,
            sc.GEN_AI_RESPONSE_ID: self.response_id,
            sc.POLICY_VERSION: self.policy_version,
            CHOICE_INDEX: choice.index if several else None,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        attributes[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(self.input_messages(choice.index), ensure_ascii=False)
        if self.operation == "chat" and self.request.get("tools"):
            attributes[otel_gen_ai.GEN_AI_TOOL_DEFINITIONS] = json.dumps(
                tool_definitions_to_otel(self.request["tools"]), ensure_ascii=False)
        if self.choices:
            attributes[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps([choice.output_message()], ensure_ascii=False)
            attributes[otel_gen_ai.GEN_AI_RESPONSE_FINISH_REASONS] = [choice.finish_reason or "unknown"]
        attributes.update(self._token_attributes(choice, several))
        return attributes

    def _token_attributes(self, choice: ChoiceRecord, several: bool) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        prompt_ids = choice.prompt_token_ids if choice.prompt_token_ids is not None else self.prompt_token_ids
        if prompt_ids is not None:
            attributes[sc.INPUT_TOKEN_IDS] = prompt_ids
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = len(prompt_ids)
        elif isinstance(self.usage.get("prompt_tokens"), int):
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = self.usage["prompt_tokens"]
        if choice.token_ids is not None:
            attributes[sc.OUTPUT_TOKEN_IDS] = choice.token_ids
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = len(choice.token_ids)
            # the contract is one logprob per id; a partial list would misalign every token after it
            if choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids):
                attributes[sc.OUTPUT_LOGPROBS] = choice.logprobs
        elif not several and isinstance(self.usage.get("completion_tokens"), int):
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = self.usage["completion_tokens"]
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
