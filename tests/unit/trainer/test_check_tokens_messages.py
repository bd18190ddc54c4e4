"""Messages survive the trip proxy -> span -> check-tokens as vLLM would render them."""

from __future__ import annotations

import json

import pytest

from tracetrain.collector.proxy_capture import chat_message_to_otel, tool_definitions_to_otel
from tracetrain.trainer.tokenizer_chat import chat_messages, otel_message_to_chat, output_text, tool_definitions

CALL = {"id": "call-1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "6*7"}'}}

# (OpenAI message as the agent sent it, the dict vLLM's chat_utils hands the template)
CASES = [
    ({"role": "user", "content": "héllo ✓"}, {"role": "user", "content": "héllo ✓"}),
    ({"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "system", "content": "a\nb"}),
    ({"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "call-1", "type": "function", "function": {"name": "calc", "arguments": {"expression": "6*7"}}}]}),
    ({"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
     {"role": "assistant", "content": "x", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}),
    ({"role": "tool", "tool_call_id": "call-1", "content": "42"},
     {"role": "tool", "tool_call_id": "call-1", "content": "42"}),
    ({"role": "assistant", "content": "42", "reasoning": "6*7=42"},
     {"role": "assistant", "content": "42", "reasoning": "6*7=42", "reasoning_content": "6*7=42"}),
    ({"role": "user", "content": "hi", "name": "ana"}, {"role": "user", "content": "hi", "name": "ana"}),
]


@pytest.mark.parametrize(("sent", "rendered"), CASES)
def test_round_trip_matches_vllm_postprocessing(sent, rendered):
    stored = json.loads(json.dumps(chat_message_to_otel(sent)))  # as the span attribute carries it
    assert otel_message_to_chat(stored) == rendered


def test_system_instructions_are_put_first():
    chat = chat_messages(json.dumps([{"role": "user", "parts": [{"type": "text", "content": "q"}]}]),
                         json.dumps([{"type": "text", "content": "be brief"}]))
    assert chat == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]


def test_tool_definitions_round_trip():
    tools = [{"type": "function", "function": {"name": "calc", "description": "d", "parameters": {"type": "object"}}}]
    attributes = json.dumps({"gen_ai.tool.definitions": json.dumps(tool_definitions_to_otel(tools))})
    assert tool_definitions(attributes) == tools
    assert tool_definitions("{}") is None


def test_output_text():
    assert output_text(json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "a"}]}])) == ("a", None)
    assert output_text(None)[1] == "no output message"
