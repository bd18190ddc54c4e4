"""Other LLM conventions land in the same typed columns (collector/normalize.py, span_rows.py).

The recorded fixtures come from the real instrumentations (tests/fixtures/conventions/
record_fixtures.py): the same two-turn tool-using chat through each of them.
"""

from __future__ import annotations

import json

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.fixtures.conventions import otlp_fixtures as fx
from tracetrain.collector import otlp_wire, span_rows
from tracetrain.collector.normalize import content_parts, ensure_parts, make_message
from tracetrain.instrumentation import semconv as sc

SPAN_STYLES = ["recorded_traceloop", "recorded_traceloop_legacy", "recorded_openai_v2_span", "recorded_openinference"]
SYSTEM = {"role": "system", "parts": [{"type": "text", "content": "You are a calculator agent."}]}
USER = {"role": "user", "parts": [{"type": "text", "content": "What is 6*7? Use the calculator."}]}
CALL = {"type": "tool_call", "id": "call_fake-1_0", "name": "calculator", "arguments": {"expression": "6*7"}}


def _rows(request_bytes: bytes) -> list[dict]:
    decoded = span_rows.decode_request(otlp_wire.parse_protobuf(request_bytes), 1, 8 << 20)
    assert decoded.spans_rejected == 0
    return [row for _, batch in decoded.batches for row in batch.to_pylist()]


def _canonical(messages_json: str) -> list[dict]:
    """Messages with parts' keys sorted and finish reasons dropped (they differ by convention, as sent)."""
    messages = json.loads(messages_json)
    for message in messages:
        message.pop("finish_reason", None)
        message["parts"] = [dict(sorted(part.items())) for part in message["parts"]]
    return messages


def _span(attrs: dict, name: str = "llm", resource: dict | None = None) -> bytes:
    def value(v):
        if isinstance(v, bool):
            return common_pb2.AnyValue(bool_value=v)
        if isinstance(v, int):
            return common_pb2.AnyValue(int_value=v)
        if isinstance(v, float):
            return common_pb2.AnyValue(double_value=v)
        if isinstance(v, list):
            return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[value(x) for x in v]))
        return common_pb2.AnyValue(string_value=v)

    def kvs(d):
        return [common_pb2.KeyValue(key=k, value=value(v)) for k, v in d.items()]

    span = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name=name, kind=3,
                          start_time_unix_nano=1, end_time_unix_nano=2, attributes=kvs(attrs))
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=kvs(resource or {})),
        scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]).SerializeToString()


# ---------------------------------------------------------------- recorded spans


@pytest.mark.parametrize("name", SPAN_STYLES)
def test_recorded_styles_give_the_same_columns(name):
    fixture = fx.load(name)
    rows = _rows(fx.traces_protobuf(fixture))
    calls = sorted((r for r in rows if r[sc.COL_OPERATION] == "chat"), key=lambda r: r[sc.COL_INPUT_TOKENS])
    assert [(c[sc.COL_INPUT_TOKENS], c[sc.COL_OUTPUT_TOKENS]) for c in calls] == [(117, 82), (227, 18)]
    assert all(c[sc.COL_PROVIDER] == "openai" and c[sc.COL_REQUEST_MODEL] == "tiny" for c in calls)
    # resource attributes (OTEL_RESOURCE_ATTRIBUTES) stay in the resource: the views rank them
    # below ids set on the trace's spans (tests/integration/test_capture_examples.py)
    assert all(json.loads(r[sc.COL_RESOURCE_ATTRIBUTES])["tracetrain.episode.id"] == f"ep-{fixture['style']}"
               for r in rows)
    first, second = calls
    assert _canonical(first[sc.COL_INPUT_MESSAGES]) == [SYSTEM, USER]
    assert _canonical(first[sc.COL_OUTPUT_MESSAGES]) == [{"role": "assistant", "parts": [CALL]}]
    tool = {"role": "tool", "parts": [{"id": "call_fake-1_0", "response": "42", "type": "tool_call_response"}]}
    assert _canonical(second[sc.COL_INPUT_MESSAGES]) == [SYSTEM, USER, {"role": "assistant", "parts": [CALL]}, tool]
    assert _canonical(second[sc.COL_OUTPUT_MESSAGES]) == [
        {"role": "assistant", "parts": [{"content": "The answer is 42.", "type": "text"}]}]
    assert json.loads(second[sc.COL_OUTPUT_MESSAGES])[0]["finish_reason"] == "stop"
    agent = next(r for r in rows if r[sc.COL_NAME] == "calc-agent")
    assert agent[sc.COL_AGENT_NAME] == "calc-agent"


@pytest.mark.parametrize("name", ["recorded_traceloop_legacy", "recorded_openinference"])
def test_indexed_message_keys_leave_attributes(name):
    for row in _rows(fx.traces_protobuf(fx.load(name))):
        attributes = json.loads(row[sc.COL_ATTRIBUTES])
        assert not any(k.startswith(("gen_ai.prompt.", "gen_ai.completion.", "llm.input_messages.",
                                     "llm.output_messages.")) for k in attributes), attributes
        if row[sc.COL_NAME] != "calc-agent":
            assert row[sc.COL_OPERATION] == "chat"  # from llm.request.type / openinference.span.kind


def test_recorded_legacy_output_maps_finish_reason_to_the_otel_enum():
    rows = _rows(fx.traces_protobuf(fx.load("recorded_traceloop_legacy")))
    first = min((r for r in rows if r[sc.COL_OPERATION] == "chat"), key=lambda r: r[sc.COL_INPUT_TOKENS])
    assert json.loads(first[sc.COL_OUTPUT_MESSAGES])[0]["finish_reason"] == "tool_call"


# ---------------------------------------------------------------- hand-made cases


def test_span_without_trigger_keys_never_calls_normalize(monkeypatch):
    def boom(*args):
        raise AssertionError("normalize called for a plain GenAI span")

    monkeypatch.setattr(span_rows, "normalize", boom)
    rows = _rows(fx.traces_protobuf(fx.load("recorded_openai_v2_span")))
    assert len(rows) == 3


def test_openinference_contents_prompts_and_agent_kind():
    (row,) = _rows(_span({
        sc.OPENINFERENCE_SPAN_KIND: "LLM", "llm.provider": "azure", "llm.system": "openai",
        "llm.request.model_name": "gpt-x", "llm.response.model_name": "gpt-x-2024", "session.id": "sess-1",
        "llm.input_messages.0.message.role": "user",
        "llm.input_messages.0.message.contents.0.message_content.type": "text",
        "llm.input_messages.0.message.contents.0.message_content.text": "what is this?",
        "llm.input_messages.0.message.contents.1.message_content.type": "image",
        "llm.input_messages.0.message.contents.1.message_content.image.image.url": "https://x/cat.png",
        "llm.output_messages.0.message.role": "assistant", "llm.output_messages.0.message.content": "a cat",
        "llm.finish_reason": "stop", "agent.name": "vision-agent", "llm.tools.0.tool.json_schema": "{}"}))
    assert json.loads(row[sc.COL_INPUT_MESSAGES]) == [{"role": "user", "parts": [
        {"type": "text", "content": "what is this?"},
        {"type": "uri", "modality": "image", "uri": "https://x/cat.png"}]}]
    assert json.loads(row[sc.COL_OUTPUT_MESSAGES]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "a cat"}], "finish_reason": "stop"}]
    assert (row[sc.COL_PROVIDER], row[sc.COL_REQUEST_MODEL], row[sc.COL_RESPONSE_MODEL]) == ("azure", "gpt-x",
                                                                                            "gpt-x-2024")
    assert (row[sc.COL_AGENT_NAME], row[sc.COL_CONVERSATION_ID], row[sc.COL_OPERATION]) == (
        "vision-agent", "sess-1", "chat")
    assert "llm.tools.0.tool.json_schema" in json.loads(row[sc.COL_ATTRIBUTES])

    (legacy,) = _rows(_span({sc.OPENINFERENCE_SPAN_KIND: "LLM", "llm.prompts.0.prompt.text": "1+1=",
                             "llm.choices.0.completion.text": "2"}))
    assert legacy[sc.COL_OPERATION] == "text_completion"
    assert json.loads(legacy[sc.COL_OUTPUT_MESSAGES])[0]["parts"][0]["content"] == "2"

    (agent,) = _rows(_span({sc.OPENINFERENCE_SPAN_KIND: "AGENT"}, name="planner"))
    assert (agent[sc.COL_OPERATION], agent[sc.COL_AGENT_NAME]) == ("invoke_agent", "planner")


def test_traceloop_vendor_names_and_request_types():
    (row,) = _rows(_span({sc.TRACELOOP_REQUEST_TYPE: "completion", sc.GEN_AI_SYSTEM: "MistralAI",
                          "gen_ai.prompt.0.content": "Once upon", "gen_ai.completion.0.content": " a time"}))
    assert (row[sc.COL_OPERATION], row[sc.COL_PROVIDER]) == ("text_completion", "mistral_ai")
    assert json.loads(row[sc.COL_INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text",
                                                                                  "content": "Once upon"}]}]
    (explicit,) = _rows(_span({sc.TRACELOOP_REQUEST_TYPE: "chat", sc.GEN_AI_SYSTEM: "Anthropic",
                               sc.GEN_AI_PROVIDER_NAME: "anthropic", sc.GEN_AI_OPERATION_NAME: "chat"}))
    assert explicit[sc.COL_PROVIDER] == "anthropic"
    (tool,) = _rows(_span({sc.TRACELOOP_SPAN_KIND: "tool", sc.TRACELOOP_ENTITY_NAME: "search"}))
    assert (tool[sc.COL_OPERATION], tool[sc.COL_AGENT_NAME]) == ("execute_tool", None)


def test_explicit_genai_keys_win_over_normalized_ones():
    given = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "explicit"}]}])
    (row,) = _rows(_span({sc.GEN_AI_INPUT_MESSAGES: given, sc.GEN_AI_OPERATION_NAME: "generate_content",
                          "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "indexed",
                          sc.GEN_AI_AGENT_NAME: "a", sc.TRACELOOP_SPAN_KIND: "agent", sc.TRACELOOP_ENTITY_NAME: "b"}))
    assert row[sc.COL_INPUT_MESSAGES] == given and row[sc.COL_OPERATION] == "generate_content"
    assert row[sc.COL_AGENT_NAME] == "a"
    assert json.loads(row[sc.COL_ATTRIBUTES])["gen_ai.prompt.0.content"] == "indexed"  # not used: kept


def test_resource_ids_rank_below_the_trace_and_fill_the_rest(tmp_path):
    """Resource ids (OTEL_RESOURCE_ATTRIBUTES) never override ids set on the trace's own spans."""
    from tracetrain.collector.reader import query
    from tracetrain.collector.segment_io import write_parquet
    from tracetrain.collector.store_layout import ensure_store, partition_dir
    from tracetrain.collector.reader import ensure_schema_anchor
    import pyarrow as pa

    resource = {sc.SERVICE_NAME: "svc", sc.TASK_ID: "task-r", sc.EPISODE_ID: 7, sc.ROLLOUT_ID: "r-1",
                sc.GEN_AI_AGENT_NAME: "res-agent"}
    (row,) = _rows(_span({sc.TASK_ID: "task-span"}, resource=resource))
    assert (row[sc.COL_TASK_ID], row[sc.COL_EPISODE_ID], row[sc.COL_ROLLOUT_ID], row[sc.COL_AGENT_NAME]) == (
        "task-span", None, None, None)
    ensure_store(tmp_path)
    ensure_schema_anchor(tmp_path)
    directory = partition_dir(tmp_path, "2026-01-01", "svc")
    directory.mkdir(parents=True)
    from tracetrain.collector.schema import SPAN_SCHEMA
    write_parquet(pa.Table.from_pylist([row], SPAN_SCHEMA), directory / "part-w0-000000000001.parquet")
    (found,) = query(tmp_path, "SELECT task_id, episode_id, rollout_id, agent_name FROM llm_calls "
                               "UNION ALL SELECT task_id, episode_id, rollout_id, agent_name FROM episodes "
                               "LIMIT 1").to_pylist() or [None]
    assert found == {"task_id": "task-span", "episode_id": "7", "rollout_id": "r-1", "agent_name": "res-agent"}


def test_message_columns_always_hold_json():
    (row,) = _rows(_span({sc.GEN_AI_INPUT_MESSAGES: "plain text, not JSON", sc.GEN_AI_OUTPUT_MESSAGES: ""}))
    assert json.loads(row[sc.COL_INPUT_MESSAGES]) == "plain text, not JSON"
    assert json.loads(row[sc.COL_OUTPUT_MESSAGES]) == ""


@pytest.mark.parametrize("attrs", [
    {"gen_ai.prompt.0.role": 5, "gen_ai.prompt.0.content": [1, 2], "gen_ai.prompt.x.content": "bad index",
     "gen_ai.prompt.\u00b2.content": "superscript", "gen_ai.prompt." + "9" * 5000 + ".role": "huge"},
    {sc.OPENINFERENCE_SPAN_KIND: 3, "llm.input_messages.0.message.role": "user"},
    {sc.OPENINFERENCE_SPAN_KIND: "LLM", "llm.output_messages.0.message.tool_calls.0.tool_call.id": "c",
     "llm.finish_reason": ["x"]},
    {sc.TRACELOOP_REQUEST_TYPE: ["chat"], sc.TRACELOOP_SPAN_KIND: 1},
])
def test_odd_values_are_stored_not_fatal(attrs):
    (row,) = _rows(_span(attrs))
    for column in (sc.COL_INPUT_MESSAGES, sc.COL_OUTPUT_MESSAGES, sc.COL_ATTRIBUTES):
        if row[column] is not None:
            json.loads(row[column])


# ---------------------------------------------------------------- converters


def test_content_parts_accepts_text_openai_parts_and_otel_parts():
    assert content_parts("hi") == [{"type": "text", "content": "hi"}]
    assert content_parts(None) == [] and content_parts("") == []
    openai_parts = json.dumps([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u"}}])
    assert content_parts(openai_parts) == [{"type": "text", "content": "look"},
                                           {"type": "uri", "modality": "image", "uri": "u"}]
    assert content_parts("[not json") == [{"type": "text", "content": "[not json"}]
    assert content_parts([{"type": "text", "content": "otel"}]) == [{"type": "text", "content": "otel"}]


def test_make_message_and_ensure_parts():
    assert make_message("tool", "42", tool_call_id="c1") == {
        "role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "42"}]}
    openai_style = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}]
    assert ensure_parts(openai_style) == [{"role": "assistant", "parts": [
        {"type": "tool_call", "id": "c1", "name": "f", "arguments": {"a": 1}}]}]
    otel = [{"role": "user", "parts": []}]
    assert ensure_parts(otel) == otel and ensure_parts("x") == "x"
