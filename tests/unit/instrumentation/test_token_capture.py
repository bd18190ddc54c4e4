"""Request augmentation, response and stream extraction, span attributes (pure functions)."""

from __future__ import annotations

import json

import pytest

from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.genai_span import input_message, response_attributes, stream_attributes
from tracetrain.instrumentation.token_capture import (
    CHAT, REASON_NOT_IN_RESPONSE, TEXT_COMPLETION, Capture, ChoiceTokens, StreamAccumulator, augment_request,
    capture_response, int_list,
)


def test_augment_adds_both_fields_for_chat():
    assert augment_request({"model": "m"}, None, CHAT) == {"return_token_ids": True, "logprobs": True}


def test_augment_legacy_completions_uses_integer_logprobs():
    assert augment_request({"model": "m"}, {}, TEXT_COMPLETION) == {"return_token_ids": True, "logprobs": 0}


@pytest.mark.parametrize("body, extra, expected", [
    ({"logprobs": False}, None, {"return_token_ids": True}),                  # the caller said no logprobs
    ({}, {"return_token_ids": False}, {"logprobs": True}),                     # ... or no ids, via extra_body
    ({"logprobs": True}, {"return_token_ids": True}, None),                    # nothing left to add
])
def test_augment_never_overrides_the_caller(body, extra, expected):
    assert augment_request(body, extra, CHAT) == expected


def _chat_response(n: int = 1, with_ids: bool = True) -> dict:
    choices = []
    for index in range(n):
        choice = {"index": index, "message": {"role": "assistant", "content": f"hi {index}"}, "finish_reason": "stop",
                  "logprobs": {"content": [{"token": "h", "logprob": -0.5 - index}, {"token": "i", "logprob": -0.25}]}}
        if with_ids:
            choice["token_ids"] = [10 + index, 11]
        choices.append(choice)
    body = {"id": "chatcmpl-1", "model": "lora-a", "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n}}
    if with_ids:
        body["prompt_token_ids"] = [1, 2, 3]
    return body


def test_chat_response_attributes():
    capture = capture_response(_chat_response())
    capture.policy_version = 7
    assert capture.attributes() == {
        sc.GEN_AI_RESPONSE_MODEL: "lora-a", sc.POLICY_VERSION: 7, sc.INPUT_TOKEN_IDS: [1, 2, 3],
        sc.OUTPUT_TOKEN_IDS: [10, 11], sc.OUTPUT_LOGPROBS: [-0.5, -0.25]}


def test_n_choices_go_to_per_choice_keys():
    attrs = capture_response(_chat_response(n=3)).attributes()
    assert attrs[sc.OUTPUT_TOKEN_IDS] == [10, 11] and attrs[sc.OUTPUT_CHOICE_COUNT] == 3
    assert attrs["tracetrain.output.choice.2.token_ids"] == [12, 11]
    assert attrs["tracetrain.output.choice.1.logprobs"] == [-1.5, -0.25]
    assert "tracetrain.output.choice.0.token_ids" not in attrs


def test_missing_ids_are_not_invented():
    attrs = capture_response(_chat_response(with_ids=False)).attributes()
    assert attrs == {sc.GEN_AI_RESPONSE_MODEL: "lora-a", sc.TOKEN_IDS_UNAVAILABLE_REASON: REASON_NOT_IN_RESPONSE}


def test_misaligned_logprobs_are_dropped_but_ids_kept():
    capture = Capture(choices={0: ChoiceTokens([1, 2, 3], [-0.1, -0.2])})
    attrs = capture.attributes()
    assert attrs[sc.OUTPUT_TOKEN_IDS] == [1, 2, 3] and sc.OUTPUT_LOGPROBS not in attrs


def test_legacy_completion_ids_are_per_choice():
    response = {"model": "m", "choices": [{"index": 0, "text": "x", "prompt_token_ids": [5, 6], "token_ids": [7, 2],
                                           "logprobs": {"token_logprobs": [-0.1, -0.2], "tokens": ["x", "<e>"]}}]}
    attrs = capture_response(response).attributes()
    assert attrs[sc.INPUT_TOKEN_IDS] == [5, 6] and attrs[sc.OUTPUT_LOGPROBS] == [-0.1, -0.2]


@pytest.mark.parametrize("value, expected", [([1, 2], [1, 2]), ([], None), ([1, True], None), ("12", None),
                                             ([1.0], None), (None, None)])
def test_int_list_accepts_only_int_lists(value, expected):
    assert int_list(value) == expected


def _chunks(n: int) -> list[dict]:
    """A vLLM-style stream: prompt ids first, then per-choice deltas, interleaved across choices."""
    chunks = [{"id": "c1", "model": "m", "prompt_token_ids": [1, 2], "choices": [
        {"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(n)]}]
    for step in range(3):
        for index in range(n):
            chunks.append({"id": "c1", "model": "m", "choices": [{
                "index": index, "delta": {"content": f"t{step}"}, "token_ids": [100 * index + step],
                "logprobs": {"content": [{"logprob": -step - index / 10}]},
                "finish_reason": "stop" if step == 2 else None}]})
    chunks.append({"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3 * n}})
    return chunks


def test_stream_accumulates_per_choice():
    accumulator = StreamAccumulator(keep_messages=True)
    for chunk in _chunks(2):
        accumulator.add(chunk)
    attrs = accumulator.capture().attributes()
    assert attrs[sc.INPUT_TOKEN_IDS] == [1, 2] and attrs[sc.OUTPUT_TOKEN_IDS] == [0, 1, 2]
    assert attrs[sc.OUTPUT_LOGPROBS] == [0.0, -1.0, -2.0]
    assert attrs["tracetrain.output.choice.1.token_ids"] == [100, 101, 102]
    extra = stream_attributes(accumulator, with_content=True)
    assert extra[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 6 and extra[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ["stop", "stop"]
    assert json.loads(extra[sc.GEN_AI_OUTPUT_MESSAGES])[1]["parts"] == [{"type": "text", "content": "t0t1t2"}]


def test_stream_equals_plain_response():
    """Streamed and non-streamed answers of the same call give the same attributes (as on vLLM)."""
    accumulator = StreamAccumulator()
    for chunk in _chunks(1):
        accumulator.add(chunk)
    plain = {"model": "m", "prompt_token_ids": [1, 2], "choices": [{"index": 0, "token_ids": [0, 1, 2], "logprobs": {
        "content": [{"logprob": 0.0}, {"logprob": -1.0}, {"logprob": -2.0}]}}]}
    assert accumulator.capture().attributes() == capture_response(plain).attributes()


def test_stream_with_a_chunk_missing_logprobs_keeps_ids_only():
    accumulator = StreamAccumulator()
    accumulator.add({"choices": [{"index": 0, "token_ids": [5], "logprobs": {"content": [{"logprob": -1.0}]}}]})
    accumulator.add({"choices": [{"index": 0, "token_ids": [6]}]})
    attrs = accumulator.capture().attributes()
    assert attrs[sc.OUTPUT_TOKEN_IDS] == [5, 6] and sc.OUTPUT_LOGPROBS not in attrs


def test_stream_tool_calls_are_reassembled():
    accumulator = StreamAccumulator(keep_messages=True)
    accumulator.add({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "calc", "arguments": '{"expr'}}]}}]})
    accumulator.add({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": 'ession": "1+1"}'}}]}, "finish_reason": "tool_calls"}]})
    messages = json.loads(stream_attributes(accumulator, with_content=True)[sc.GEN_AI_OUTPUT_MESSAGES])
    assert messages == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
        {"type": "tool_call", "id": "call_1", "name": "calc", "arguments": {"expression": "1+1"}}]}]


def test_messages_use_genai_parts():
    assert input_message({"role": "tool", "tool_call_id": "c1", "content": "42"}) == {
        "role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "42"}]}
    assert input_message({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}) == {
        "role": "user", "parts": [{"type": "text", "content": "a"}]}
    attrs = response_attributes(_chat_response(), with_content=True)
    assert attrs[sc.GEN_AI_RESPONSE_ID] == "chatcmpl-1" and attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == 3
    assert json.loads(attrs[sc.GEN_AI_OUTPUT_MESSAGES])[0]["parts"][0]["content"] == "hi 0"
