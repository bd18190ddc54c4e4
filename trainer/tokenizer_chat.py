"""Captured OTel GenAI messages back into what a chat template sees, and the tokenizer.

``gen_ai.input.messages`` stores each message as ``{role, parts[, name]}`` (OTel
GenAI). A chat template expects OpenAI-style dicts, post-processed the way vLLM
does before rendering (vllm/entrypoints/chat_utils.py, "string" content format):
text parts joined with a newline, missing content as ``""``, tool-call arguments
as parsed JSON (``{}`` when unparseable), reasoning under both ``reasoning`` and
``reasoning_content``. Rendering the same dicts with the same tokenizer must give
the ids vLLM tokenized; anything else is drift worth reporting.

transformers is imported only inside ``load_tokenizer``: the trainer package must
import without it.
"""

from __future__ import annotations

import json
import os
from typing import Any


class TokenizerUnavailable(RuntimeError):
    """transformers/tokenizers are missing, or the model directory has no usable tokenizer."""


def load_tokenizer(model_dir: str) -> Any:
    """A transformers tokenizer from a local directory; never downloads."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerUnavailable(
            f"check-tokens needs transformers and tokenizers ({exc}); "
            "install them with: pip install 'tracetrain[trainer]'") from None
    if not os.path.isdir(model_dir):
        raise TokenizerUnavailable(f"--model {model_dir!r} is not a directory (a local model or tokenizer folder)")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, KeyError...)
        raise TokenizerUnavailable(f"cannot load a tokenizer from {model_dir}: {exc}") from None


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _arguments(value: Any) -> Any:
    """Tool-call arguments as vLLM gives them to templates: a dict or list, else ``{}``."""
    if isinstance(value, str):
        value = _json(value)
    return value if isinstance(value, (dict, list)) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def otel_message_to_chat(message: dict[str, Any]) -> dict[str, Any]:
    """One OTel GenAI message as the dict vLLM hands the chat template."""
    role = message.get("role", "user")
    parts = [p for p in message.get("parts") or [] if isinstance(p, dict)]
    texts = [_text(p.get("content", "")) for p in parts if p.get("type") == "text"]
    out: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    responses = [p for p in parts if p.get("type") == "tool_call_response"]
    if responses:
        out["content"] = "\n".join(_text(p.get("response", "")) for p in responses)
        if responses[0].get("id") is not None:
            out["tool_call_id"] = responses[0]["id"]
    calls = [p for p in parts if p.get("type") == "tool_call"]
    if calls:
        out["tool_calls"] = [{"id": p.get("id"), "type": "function",
                              "function": {"name": p.get("name"), "arguments": _arguments(p.get("arguments"))}}
                             for p in calls]
    reasoning = "".join(_text(p.get("content", "")) for p in parts if p.get("type") == "reasoning")
    if reasoning:
        out["reasoning"] = out["reasoning_content"] = reasoning
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def chat_messages(input_messages: str | None, system_instructions: str | None) -> list[dict[str, Any]]:
    """The chat a call was made with, from its ``input_messages`` / ``system_instructions`` columns."""
    messages = _json(input_messages) or []
    chat = [otel_message_to_chat(m) for m in messages if isinstance(m, dict)]
    instructions = _json(system_instructions)
    if instructions and not any(m["role"] == "system" for m in chat):
        # instrumentations that keep the system prompt apart put it first again for rendering
        parts = instructions if isinstance(instructions, list) else [{"type": "text", "content": instructions}]
        text = "\n".join(_text(p.get("content", "")) for p in parts if isinstance(p, dict))
        chat.insert(0, {"role": "system", "content": text})
    return chat


def tool_definitions(attributes_json: str | None) -> list[dict[str, Any]] | None:
    """OTel ``gen_ai.tool.definitions`` (flattened functions) back to OpenAI ``tools``."""
    attributes = _json(attributes_json) or {}
    definitions = _json(attributes.get("gen_ai.tool.definitions")) if isinstance(attributes, dict) else None
    if not isinstance(definitions, list) or not definitions:
        return None
    tools = []
    for tool in definitions:
        if isinstance(tool, dict):
            function = {k: v for k, v in tool.items() if k != "type"}
            tools.append({"type": tool.get("type", "function"), "function": function})
    return tools


def prompt_text(input_messages: str | None) -> str | None:
    """The prompt of a text completion (the proxy stores it as one user text part)."""
    messages = _json(input_messages) or []
    for message in messages if isinstance(messages, list) else []:
        for part in message.get("parts") or [] if isinstance(message, dict) else []:
            if isinstance(part, dict) and part.get("type") == "text":
                return _text(part.get("content", ""))
    return None


def output_text(output_messages: str | None) -> tuple[str | None, str | None]:
    """(text of the first output message, reason it cannot be re-encoded or None)."""
    messages = _json(output_messages)
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return None, "no output message"
    parts = [p for p in messages[0].get("parts") or [] if isinstance(p, dict)]
    if any(p.get("type") == "tool_call" for p in parts):
        return None, "tool call (the server parsed it out of the text)"
    if any(p.get("type") == "reasoning" for p in parts):
        return None, "reasoning (the server split it from the text)"
    return "".join(_text(p.get("content", "")) for p in parts if p.get("type") == "text"), None


def render_prompt_ids(tokenizer: Any, chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of the chat rendered with the model's template, generation prompt added."""
    ids = tokenizer.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=False, **template_kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers versions differ here
        ids = ids["input_ids"]
    return [int(i) for i in ids]
