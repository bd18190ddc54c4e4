"""Other LLM span conventions -> the span table's typed columns.

The ingest loop (``span_rows``) fills the typed columns straight from OTel GenAI
keys. Spans written to other conventions (OpenInference, Traceloop <= 0.54's
indexed ``gen_ai.prompt.<i>.*``, Traceloop SDK decorator spans) carry one of
``TRIGGER_KEYS``; only for those does the ingest loop call ``normalize``, so a
span in the current convention pays nothing here.

Messages always come out in the OTel parts format of ``gen_ai.input.messages``::

    [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]

The same converters turn the message bodies of OTLP log events into that format
(``log_rows``). docs/conventions.md has the full mapping table.
"""

from __future__ import annotations

import json
from typing import Any

from tracetrain.instrumentation import semconv as sc

NORMALIZED_RANK = 100
"""Rank of a normalized value in ``span_rows``: an explicit GenAI key always wins."""

TRIGGER_KEYS = frozenset({
    sc.OPENINFERENCE_SPAN_KIND,
    sc.TRACELOOP_REQUEST_TYPE,
    sc.TRACELOOP_SPAN_KIND,
    "gen_ai.prompt.0.role", "gen_ai.prompt.0.content",
    "gen_ai.completion.0.role", "gen_ai.completion.0.content", "gen_ai.completion.0.finish_reason",
    "llm.input_messages.0.message.role", "llm.output_messages.0.message.role",
})
"""Exact attribute keys that mark a span for ``normalize``."""

_OI_IN, _OI_OUT = sc.OPENINFERENCE_INPUT_MESSAGES + ".", sc.OPENINFERENCE_OUTPUT_MESSAGES + "."
_TL_IN, _TL_OUT = sc.TRACELOOP_PROMPT_PREFIX + ".", sc.TRACELOOP_COMPLETION_PREFIX + "."
_OI_PROMPTS, _OI_CHOICES = "llm.prompts.", "llm.choices."
_PREFIXES = (_OI_IN, _OI_OUT, _TL_IN, _TL_OUT, _OI_PROMPTS, _OI_CHOICES)

_OI_OPERATIONS = {"EMBEDDING": "embeddings", "TOOL": "execute_tool", "AGENT": "invoke_agent",
                  "RETRIEVER": "retrieval"}
_TRACELOOP_REQUEST_TYPES = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings",
                            "rerank": "rerank"}
_TRACELOOP_SPAN_KINDS = {"agent": "invoke_agent", "tool": "execute_tool", "workflow": "invoke_workflow"}
# Traceloop <= 0.54 writes capitalised vendor names into gen_ai.system (contracts.md §4).
_TRACELOOP_PROVIDERS = {"mistralai": "mistral_ai", "azure": "azure.ai.openai", "aws": "aws.bedrock",
                        "google": "gcp.gen_ai", "watsonx": "ibm.watsonx.ai", "vertexai": "gcp.vertex_ai"}


# OpenAI finish reasons -> the OTel enum (stop|length|content_filter|tool_call|error).
_FINISH_REASONS = {"tool_calls": "tool_call", "function_call": "tool_call"}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------- parts


def content_parts(content: Any) -> list[dict]:
    """A message's content (text, OpenAI content parts, or OTel parts) as OTel parts."""
    if content is None or content == "":
        return []
    if isinstance(content, str):
        if content[:1] == "[" and '"type"' in content:
            try:
                decoded = json.loads(content)
            except ValueError:
                decoded = None
            if isinstance(decoded, list) and decoded and all(isinstance(p, dict) and "type" in p for p in decoded):
                return [_content_part(p) for p in decoded]
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [_content_part(p) if isinstance(p, dict) else {"type": "text", "content": _text(p)} for p in content]
    if isinstance(content, dict):
        return [_content_part(content)]
    return [{"type": "text", "content": _text(content)}]


def _content_part(part: dict) -> dict:
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text") and "content" not in part:
        return {"type": "text", "content": part.get("text")}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return {"type": "uri", "modality": "image", "uri": url}
    if kind == "image" and "uri" not in part:  # OpenInference message_content of type image
        return {"type": "uri", "modality": "image", "uri": part.get("image.image.url") or part.get("url")}
    return part


def _json_text(text: str) -> str:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return dumps(text)
    return text


def _text(value: Any) -> str:
    return value if isinstance(value, str) else dumps(value)


def tool_call_part(call_id: Any, name: Any, arguments: Any) -> dict:
    """A tool_call part; arguments sent as a JSON object string become the object, as in OTel's own format."""
    if isinstance(arguments, str) and arguments[:1] == "{":
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    part: dict[str, Any] = {"type": "tool_call"}
    if call_id is not None:
        part["id"] = call_id
    part["name"] = name
    part["arguments"] = arguments
    return part


def make_message(role: Any, content: Any, tool_calls: list[dict] | None = None, tool_call_id: Any = None,
                 name: Any = None, finish_reason: Any = None) -> dict:
    """One OTel message. A ``tool`` message's content becomes a tool_call_response part."""
    role = role if isinstance(role, str) and role else "user"
    if role == "tool":
        part: dict[str, Any] = {"type": "tool_call_response"}
        if tool_call_id is not None:
            part["id"] = tool_call_id
        part["response"] = content
        parts = [part]
    else:
        parts = content_parts(content)
    parts.extend(tool_calls or ())
    message: dict[str, Any] = {"role": role, "parts": parts}
    if name:
        message["name"] = name
    if finish_reason:
        message["finish_reason"] = _FINISH_REASONS.get(finish_reason, finish_reason) \
            if isinstance(finish_reason, str) else finish_reason
    return message


def openai_tool_calls(calls: Any) -> list[dict]:
    """OpenAI ``tool_calls`` ([{id, type, function{name, arguments}}]) as tool_call parts."""
    parts = []
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        parts.append(tool_call_part(call.get("id"), function.get("name", call.get("name")),
                                    function.get("arguments", call.get("arguments"))))
    return parts


def ensure_parts(messages: Any) -> Any:
    """OpenAI-shaped messages ({role, content, tool_calls}) as OTel messages; OTel ones unchanged."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and "parts" not in m and ("content" in m or "tool_calls" in m):
            out.append(make_message(m.get("role"), m.get("content"), openai_tool_calls(m.get("tool_calls")),
                                    m.get("tool_call_id"), m.get("name"), m.get("finish_reason")))
        else:
            out.append(m)
    return out


# ---------------------------------------------------------------- indexed attributes


def _is_index(text: str) -> bool:
    # ASCII digits only ("²".isdigit() is true), and short enough for int().
    return 0 < len(text) <= 9 and text.isascii() and text.isdigit()


def _indexed(attrs: dict[str, Any]) -> dict[str, dict[int, dict[str, str]]]:
    """prefix -> index -> rest of the key -> full key, for every indexed message key."""
    groups: dict[str, dict[int, dict[str, str]]] = {}
    for key in attrs:
        if not key.startswith(_PREFIXES):
            continue
        prefix = next(p for p in _PREFIXES if key.startswith(p))
        index, _, rest = key[len(prefix):].partition(".")
        if _is_index(index) and rest:
            groups.setdefault(prefix, {}).setdefault(int(index), {})[rest] = key
    return groups


def _sub_indexed(fields: dict[str, str], prefix: str) -> list[dict[str, str]]:
    """``tool_calls.<j>.<rest>`` entries of one message, in index order."""
    found: dict[int, dict[str, str]] = {}
    for rest, key in fields.items():
        if rest.startswith(prefix):
            index, _, sub = rest[len(prefix):].partition(".")
            if _is_index(index) and sub:
                found.setdefault(int(index), {})[sub] = key
    return [found[i] for i in sorted(found)]


def _traceloop_messages(attrs: dict[str, Any], group: dict[int, dict[str, str]], used: set[str]) -> list[dict]:
    messages = []
    for index in sorted(group):
        fields = group[index]

        def get(name: str) -> Any:
            key = fields.get(name)
            if key is None:
                return None
            used.add(key)
            return attrs[key]

        calls = []
        for call in _sub_indexed(fields, "tool_calls."):
            used.update(call.values())
            calls.append(tool_call_part(*(attrs[call[k]] if k in call else None for k in ("id", "name", "arguments"))))
        messages.append(make_message(get("role"), get("content"), calls, get("tool_call_id"), get("name"),
                                     get("finish_reason")))
    return messages


def _openinference_messages(attrs: dict[str, Any], group: dict[int, dict[str, str]], used: set[str]) -> list[dict]:
    messages = []
    for index in sorted(group):
        fields = group[index]

        def get(name: str) -> Any:
            key = fields.get("message." + name)
            if key is None:
                return None
            used.add(key)
            return attrs[key]

        content = get("content")
        contents = _sub_indexed(fields, "message.contents.")
        if contents and content is None:
            content = []
            for entry in contents:
                used.update(entry.values())
                part = {k.removeprefix("message_content."): attrs[v] for k, v in entry.items()}
                content.append(part)
        calls = []
        for call in _sub_indexed(fields, "message.tool_calls."):
            used.update(call.values())
            value = {k.removeprefix("tool_call."): attrs[v] for k, v in call.items()}
            calls.append(tool_call_part(value.get("id"), value.get("function.name"), value.get("function.arguments")))
        messages.append(make_message(get("role"), content, calls, get("tool_call_id"), get("name")))
    return messages


def _openinference_texts(attrs: dict[str, Any], group: dict[int, dict[str, str]], field: str, role: str,
                         used: set[str]) -> list[dict]:
    messages = []
    for index in sorted(group):
        key = group[index].get(field)
        if key is not None:
            used.add(key)
            messages.append(make_message(role, attrs[key]))
    return messages


# ---------------------------------------------------------------- the normalizer


def _put(typed: dict[str, tuple[int, Any]], column: str, value: Any) -> None:
    if value is not None and column not in typed:
        typed[column] = (NORMALIZED_RANK, value)


def normalize(attrs: dict[str, Any], typed: dict[str, tuple[int, Any]], span_name: str) -> None:
    """Fill ``typed`` (column -> (rank, value)) from the non-GenAI keys in ``attrs``.

    Never overrides a column a GenAI key already set. Indexed message keys that
    were turned into ``input_messages``/``output_messages`` leave ``attrs`` (they
    are bulky, and the typed column holds them), as the GenAI message keys do.
    """
    for column in (sc.COL_INPUT_MESSAGES, sc.COL_OUTPUT_MESSAGES):  # as sent: make sure it is JSON
        entry = typed.get(column)
        if entry is not None and isinstance(entry[1], str):
            typed[column] = (entry[0], _json_text(entry[1]))
    groups = _indexed(attrs)
    used: set[str] = set()
    operation = _openinference(attrs, typed, groups, span_name, used)
    if sc.COL_INPUT_MESSAGES not in typed and _TL_IN in groups:
        _put_messages(typed, sc.COL_INPUT_MESSAGES, _traceloop_messages(attrs, groups[_TL_IN], used))
    if sc.COL_OUTPUT_MESSAGES not in typed and _TL_OUT in groups:
        _put_messages(typed, sc.COL_OUTPUT_MESSAGES, _traceloop_messages(attrs, groups[_TL_OUT], used))
    _normalize_traceloop(attrs, typed)
    if operation is None:
        request_type = attrs.get(sc.TRACELOOP_REQUEST_TYPE)
        operation = _TRACELOOP_REQUEST_TYPES.get(request_type) if isinstance(request_type, str) else None
    _put(typed, sc.COL_OPERATION, operation)
    for key in used:
        del attrs[key]


def _put_messages(typed: dict[str, tuple[int, Any]], column: str, messages: list[dict]) -> None:
    if messages:
        typed[column] = (NORMALIZED_RANK, dumps(messages))


def _openinference(attrs: dict[str, Any], typed: dict[str, tuple[int, Any]], groups: dict, span_name: str,
                   used: set[str]) -> str | None:
    """OpenInference messages and agent name into ``typed``; returns the operation it implies."""
    kind = attrs.get(sc.OPENINFERENCE_SPAN_KIND)
    if not isinstance(kind, str):
        return None
    kind = kind.upper()
    operation = "chat" if _OI_IN in groups else "text_completion" if _OI_PROMPTS in groups else None
    if sc.COL_INPUT_MESSAGES not in typed:
        if _OI_IN in groups:
            _put_messages(typed, sc.COL_INPUT_MESSAGES, _openinference_messages(attrs, groups[_OI_IN], used))
        elif _OI_PROMPTS in groups:
            _put_messages(typed, sc.COL_INPUT_MESSAGES,
                          _openinference_texts(attrs, groups[_OI_PROMPTS], "prompt.text", "user", used))
    if sc.COL_OUTPUT_MESSAGES not in typed:
        outputs = None
        if _OI_OUT in groups:
            outputs = _openinference_messages(attrs, groups[_OI_OUT], used)
        elif _OI_CHOICES in groups:
            outputs = _openinference_texts(attrs, groups[_OI_CHOICES], "completion.text", "assistant", used)
        finish = attrs.get("llm.finish_reason")
        if outputs and isinstance(finish, str):
            for message in outputs:
                message.setdefault("finish_reason", _FINISH_REASONS.get(finish, finish))
        _put_messages(typed, sc.COL_OUTPUT_MESSAGES, outputs or [])
    if kind == "AGENT":
        _put(typed, sc.COL_AGENT_NAME, span_name or None)
    return (operation or "chat") if kind == "LLM" else _OI_OPERATIONS.get(kind)


def _normalize_traceloop(attrs: dict[str, Any], typed: dict[str, tuple[int, Any]]) -> None:
    """Traceloop SDK decorator spans (agent name) and <= 0.54 vendor names."""
    kind = attrs.get(sc.TRACELOOP_SPAN_KIND)
    if isinstance(kind, str):
        if kind == "agent":
            entity = attrs.get(sc.TRACELOOP_ENTITY_NAME)
            _put(typed, sc.COL_AGENT_NAME, entity if isinstance(entity, str) and entity else None)
        _put(typed, sc.COL_OPERATION, _TRACELOOP_SPAN_KINDS.get(kind))
    provider = typed.get(sc.COL_PROVIDER)
    if (sc.TRACELOOP_REQUEST_TYPE in attrs and sc.GEN_AI_PROVIDER_NAME not in attrs and provider is not None
            and isinstance(provider[1], str)):  # from gen_ai.system
        lower = provider[1].lower()
        typed[sc.COL_PROVIDER] = (provider[0], _TRACELOOP_PROVIDERS.get(lower, lower))
