"""Token ids and logprobs out of OpenAI-API responses, as span attributes.

Pure functions and one accumulator, no I/O and no OpenAI import: they read the
client's response objects (pydantic models, whose unknown fields such as vLLM's
``prompt_token_ids`` are plain attributes) or the same data as dicts, so they are
unit-tested on dicts and used on live objects.

vLLM's OpenAI API (``return_token_ids: true``) puts the prompt ids at the top level
of a chat response and the generated ids on each choice; ``/v1/completions`` puts
both on each choice. Streaming sends the prompt ids on a choice's first chunk and
each later chunk's ids for its delta only, so they are concatenated per choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field as dataclass_field
from typing import Any

from tracetrain.instrumentation import semconv as sc

CHAT = "chat"
TEXT_COMPLETION = "text_completion"

# Reasons recorded in semconv.TOKEN_IDS_UNAVAILABLE_REASON.
REASON_REJECTED = "rejected_by_endpoint"
REASON_NOT_IN_RESPONSE = "not_in_response"
REASON_DISABLED = "capture_disabled"
REASON_HOSTED = "hosted_api"
REASON_RAW = "raw_response"
REASON_ERROR = "capture_error"


def field(obj: Any, name: str) -> Any:
    """``obj[name]`` for a mapping, ``obj.name`` otherwise; None when absent."""
    if type(obj) is dict:  # the common cases first: an ABC isinstance per token would cost more
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None and isinstance(obj, Mapping):
        return obj.get(name)
    return value


def int_list(value: Any) -> list[int] | None:
    """``value`` as a list of ints, or None unless it is a non-empty list of them."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if set(map(type, value)) == {int}:  # exact type: bool is not a token id (map+set run in C)
        return list(value)
    return None


def _float_list(values: list[Any]) -> list[float] | None:
    if not values:
        return None
    types = set(map(type, values))
    if types == {float}:
        return list(values)
    if types <= {float, int}:
        return [float(v) for v in values]
    return None


def choice_logprobs(choice: Any) -> list[float] | None:
    """Sampled-token logprobs of a choice or chunk choice, chat or legacy format."""
    logprobs = field(choice, "logprobs")
    if logprobs is None:
        return None
    content = field(logprobs, "content")
    if content is not None:  # chat: logprobs.content[i].logprob
        return _float_list([field(entry, "logprob") for entry in content]) if content else None
    token_logprobs = field(logprobs, "token_logprobs")  # legacy completions
    return _float_list(list(token_logprobs)) if token_logprobs else None


def augment_request(body: Mapping[str, Any], extra_json: Any, operation: str) -> dict[str, Any] | None:
    """The fields to add so vLLM returns ids and logprobs, or None when there is nothing to add.

    A field the caller set, in the body or in ``extra_body``, is left as it is, even
    ``logprobs=False``: the caller's choice wins.
    """
    caller = extra_json if isinstance(extra_json, Mapping) else {}
    additions: dict[str, Any] = {}
    if "return_token_ids" not in body and "return_token_ids" not in caller:
        additions["return_token_ids"] = True
    if "logprobs" not in body and "logprobs" not in caller:
        # chat takes a bool; legacy completions an int (0 = only the sampled token's logprob)
        additions["logprobs"] = True if operation == CHAT else 0
    return additions or None


@dataclass
class ChoiceTokens:
    """What one choice generated."""

    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass
class Capture:
    """Everything the LLM span gets from one response (plain or streamed)."""

    prompt_token_ids: list[int] | None = None
    choices: dict[int, ChoiceTokens] = dataclass_field(default_factory=dict)
    response_model: str | None = None
    policy_version: int | None = None
    unavailable_reason: str | None = None

    def attributes(self) -> dict[str, Any]:
        """Span attributes per docs/capture.md: choice 0 in the main keys, others per index."""
        attrs: dict[str, Any] = {}
        if self.response_model:
            attrs[sc.GEN_AI_RESPONSE_MODEL] = self.response_model
        if self.policy_version is not None:
            attrs[sc.POLICY_VERSION] = self.policy_version
        first = self.choices.get(0)
        if first is None or first.token_ids is None:
            attrs[sc.TOKEN_IDS_UNAVAILABLE_REASON] = self.unavailable_reason or REASON_NOT_IN_RESPONSE
            return attrs  # a prompt without a response is no training sample: record nothing else
        if self.prompt_token_ids:
            attrs[sc.INPUT_TOKEN_IDS] = self.prompt_token_ids
        for index, choice in sorted(self.choices.items()):
            if choice.token_ids is None:
                continue
            # logprobs only when aligned with the ids: the contract is one per token
            aligned = choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
            if index == 0:
                attrs[sc.OUTPUT_TOKEN_IDS] = choice.token_ids
                if aligned:
                    attrs[sc.OUTPUT_LOGPROBS] = choice.logprobs
            else:
                attrs[sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=index)] = choice.token_ids
                if aligned:
                    attrs[sc.OUTPUT_CHOICE_LOGPROBS_TEMPLATE.format(index=index)] = choice.logprobs
        if len(self.choices) > 1:
            attrs[sc.OUTPUT_CHOICE_COUNT] = len(self.choices)
        return attrs


def capture_response(response: Any) -> Capture:
    """Ids and logprobs of a non-streamed chat or legacy completion response."""
    capture = Capture(prompt_token_ids=int_list(field(response, "prompt_token_ids")),
                      response_model=_str_or_none(field(response, "model")))
    for position, choice in enumerate(field(response, "choices") or ()):
        index = field(choice, "index")
        index = index if type(index) is int else position
        if capture.prompt_token_ids is None:  # /v1/completions: per choice
            capture.prompt_token_ids = int_list(field(choice, "prompt_token_ids"))
        capture.choices[index] = ChoiceTokens(int_list(field(choice, "token_ids")), choice_logprobs(choice))
    return capture


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class StreamAccumulator:
    """Concatenates ids, logprobs (and, when asked, text and tool calls) chunk by chunk.

    ``keep_messages`` is for tracetrain's own span, which also records the output
    messages and usage; on another instrumentation's span those are its job.
    """

    def __init__(self, keep_messages: bool = False):
        self.keep_messages = keep_messages
        self.prompt_token_ids: list[int] | None = None
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.logprobs_broken: set[int] = set()
        self.seen_choices: set[int] = set()
        self.model: str | None = None
        self.response_id: str | None = None
        self.usage: Any = None
        self.text: dict[int, list[str]] = {}
        self.tool_calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.finish_reasons: dict[int, str] = {}

    def add(self, chunk: Any) -> None:
        """Take one chunk (a ChatCompletionChunk, Completion chunk, or dict)."""
        if self.prompt_token_ids is None:
            self.prompt_token_ids = int_list(field(chunk, "prompt_token_ids"))
        if self.model is None:
            self.model = _str_or_none(field(chunk, "model"))
            self.response_id = _str_or_none(field(chunk, "id"))
        usage = field(chunk, "usage")
        if usage is not None:
            self.usage = usage
        for choice in field(chunk, "choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: Any) -> None:
        index = field(choice, "index")
        index = index if type(index) is int else 0
        self.seen_choices.add(index)
        if self.prompt_token_ids is None:
            self.prompt_token_ids = int_list(field(choice, "prompt_token_ids"))
        ids = int_list(field(choice, "token_ids"))
        if ids:
            self.token_ids.setdefault(index, []).extend(ids)
            logprobs = choice_logprobs(choice)
            if logprobs is None or len(logprobs) != len(ids):
                self.logprobs_broken.add(index)  # never pair ids with misaligned logprobs
            else:
                self.logprobs.setdefault(index, []).extend(logprobs)
        finish_reason = field(choice, "finish_reason")
        if finish_reason:
            self.finish_reasons[index] = finish_reason
        if self.keep_messages:
            self._add_message_parts(index, choice)

    def _add_message_parts(self, index: int, choice: Any) -> None:
        delta = field(choice, "delta")
        text = field(delta, "content") if delta is not None else field(choice, "text")
        if isinstance(text, str) and text:
            self.text.setdefault(index, []).append(text)
        for call in (field(delta, "tool_calls") or ()) if delta is not None else ():
            slot = field(call, "index")
            entry = self.tool_calls.setdefault(index, {}).setdefault(slot if type(slot) is int else 0,
                                                                     {"id": None, "name": None, "arguments": ""})
            entry["id"] = field(call, "id") or entry["id"]
            function = field(call, "function")
            if function is not None:
                entry["name"] = field(function, "name") or entry["name"]
                entry["arguments"] += field(function, "arguments") or ""

    def capture(self) -> Capture:
        """The accumulated ids and logprobs, per choice."""
        capture = Capture(prompt_token_ids=self.prompt_token_ids, response_model=self.model)
        for index in sorted(self.seen_choices | set(self.token_ids)):
            ids = self.token_ids.get(index)
            logprobs = None if index in self.logprobs_broken else self.logprobs.get(index)
            capture.choices[index] = ChoiceTokens(ids, logprobs)
        return capture
