"""tracetrain's own GenAI client span, for when no other instrumentation makes one.

When ``opentelemetry-instrumentation-openai`` (or another GenAI instrumentation) is
active, its span carries the request and response attributes and tracetrain only
adds token ids. Without one, the instrumentor opens a span named ``chat {model}``
(``text_completion {model}``) with the OTel GenAI attributes built here, so the
call still becomes a complete ``llm_calls`` row. Messages use the GenAI "parts"
JSON format and are recorded only when OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
says so (the tracetrain distro turns it on).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.token_capture import CHAT, StreamAccumulator, field

PROVIDER = "openai"  # the API spoken; the server behind it may be vLLM
LLM_OPERATIONS = frozenset({"chat", "text_completion", "completion", "generate_content"})


def is_llm_span(span: Any) -> bool:
    """Whether ``span`` is an LLM-call span opened by some instrumentation around this call."""
    attributes = getattr(span, "attributes", None) or {}
    if attributes.get(sc.GEN_AI_OPERATION_NAME) in LLM_OPERATIONS:
        return True
    return str(getattr(span, "name", "")).startswith("openai.")  # Traceloop: openai.chat, openai.completion


def span_name(operation: str, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return f"{operation} {model}" if isinstance(model, str) and model else operation


def request_attributes(operation: str, body: Mapping[str, Any], base_url: str, with_content: bool) -> dict[str, Any]:
    """GenAI request attributes of a chat or legacy completion request body."""
    attrs: dict[str, Any] = {sc.GEN_AI_OPERATION_NAME: operation, sc.GEN_AI_PROVIDER_NAME: PROVIDER}
    if isinstance(body.get("model"), str):
        attrs[sc.GEN_AI_REQUEST_MODEL] = body["model"]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if type(max_tokens) is int:
        attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        attrs[sc.GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
    if type(body.get("n")) is int:
        attrs[sc.GEN_AI_REQUEST_CHOICE_COUNT] = body["n"]
    url = urlsplit(base_url)
    if url.hostname:
        attrs[sc.SERVER_ADDRESS] = url.hostname
    if url.port:
        attrs[sc.SERVER_PORT] = url.port
    if with_content:
        if operation == CHAT:
            attrs[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [input_message(m) for m in body.get("messages") or ()], ensure_ascii=False, default=str)
        elif isinstance(body.get("prompt"), str):
            attrs[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": body["prompt"]}]}], ensure_ascii=False)
    return attrs


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # content parts: keep the text ones
        return "".join(field(part, "text") or "" for part in content if field(part, "type") == "text")
    return None


def _tool_call_part(call: Any) -> dict[str, Any]:
    function = field(call, "function") or {}
    arguments = field(function, "arguments")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass  # keep the model's malformed JSON as the string it produced
    return {"type": "tool_call", "id": field(call, "id"), "name": field(function, "name"), "arguments": arguments}


def input_message(message: Any) -> dict[str, Any]:
    """One OpenAI chat message as a GenAI message with parts."""
    role = field(message, "role") or "user"
    parts: list[dict[str, Any]] = []
    text = _text(field(message, "content"))
    if role == "tool":
        parts.append({"type": "tool_call_response", "id": field(message, "tool_call_id"), "response": text})
    elif text:
        parts.append({"type": "text", "content": text})
    parts += [_tool_call_part(call) for call in field(message, "tool_calls") or ()]
    return {"role": role, "parts": parts}


def _usage_attributes(usage: Any) -> dict[str, Any]:
    attrs = {}
    if usage is not None:
        if type(field(usage, "prompt_tokens")) is int:
            attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = field(usage, "prompt_tokens")
        if type(field(usage, "completion_tokens")) is int:
            attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = field(usage, "completion_tokens")
    return attrs


def response_attributes(response: Any, with_content: bool) -> dict[str, Any]:
    """GenAI response attributes of a non-streamed chat or legacy completion response."""
    attrs = _usage_attributes(field(response, "usage"))
    if isinstance(field(response, "id"), str):
        attrs[sc.GEN_AI_RESPONSE_ID] = field(response, "id")
    choices = list(field(response, "choices") or ())
    reasons = [field(c, "finish_reason") or "" for c in choices]
    if choices:
        attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
    if with_content and choices:
        messages = []
        for choice, reason in zip(choices, reasons, strict=True):
            message = field(choice, "message")
            parts = input_message(message)["parts"] if message is not None else (
                [{"type": "text", "content": field(choice, "text")}] if field(choice, "text") else [])
            messages.append({"role": "assistant", "parts": parts, "finish_reason": reason})
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False, default=str)
    return attrs


def stream_attributes(accumulator: StreamAccumulator, with_content: bool) -> dict[str, Any]:
    """GenAI response attributes of a streamed response, from what the chunks carried."""
    attrs = _usage_attributes(accumulator.usage)
    if accumulator.response_id:
        attrs[sc.GEN_AI_RESPONSE_ID] = accumulator.response_id
    indices = sorted(accumulator.seen_choices)
    if indices:
        attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = [accumulator.finish_reasons.get(i, "") for i in indices]
    if with_content and indices:
        messages = []
        for index in indices:
            parts: list[dict[str, Any]] = []
            text = "".join(accumulator.text.get(index, ()))
            if text:
                parts.append({"type": "text", "content": text})
            for _, call in sorted(accumulator.tool_calls.get(index, {}).items()):
                parts.append(_tool_call_part({"id": call["id"], "function": call}))
            messages.append({"role": "assistant", "parts": parts,
                             "finish_reason": accumulator.finish_reasons.get(index, "")})
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False, default=str)
    return attrs
