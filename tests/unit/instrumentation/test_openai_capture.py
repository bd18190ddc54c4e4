"""The OpenAI-client instrumentor in process: real client, real SDK, the fake vLLM server on loopback."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode

from tracetrain.instrumentation import drops, openai_capture
from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.openai_capture import TracetrainOpenAIInstrumentor
from tracetrain.instrumentation.token_capture import StreamAccumulator

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)


def _only_span(exporter):
    finished = exporter.get_finished_spans()
    assert len(finished) == 1, [s.name for s in finished]
    return finished[0]


def _assert_captured(span, record, choice: int = 0):
    attrs = span.attributes
    assert list(attrs[sc.INPUT_TOKEN_IDS]) == record["prompt_token_ids"]
    ids_key = sc.OUTPUT_TOKEN_IDS if choice == 0 else sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=choice)
    logprobs_key = sc.OUTPUT_LOGPROBS if choice == 0 else sc.OUTPUT_CHOICE_LOGPROBS_TEMPLATE.format(index=choice)
    assert list(attrs[ids_key]) == record["choices"][choice]["token_ids"]
    assert list(attrs[logprobs_key]) == record["choices"][choice]["logprobs"]
    assert sc.TOKEN_IDS_UNAVAILABLE_REASON not in attrs


def test_plain_call_gets_its_own_genai_span(spans, fake_server, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    reply = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.5)
    assert reply.choices[0].message.content == "You said: hello"
    span = _only_span(spans)
    assert span.name == "chat tiny" and span.kind is SpanKind.CLIENT
    _assert_captured(span, fake_server.responses[-1])
    attrs = span.attributes
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "chat" and attrs[sc.GEN_AI_REQUEST_MODEL] == "tiny"
    assert attrs[sc.GEN_AI_RESPONSE_MODEL] == "tiny" and attrs[sc.GEN_AI_REQUEST_TEMPERATURE] == 0.5
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == len(fake_server.responses[-1]["prompt_token_ids"])
    assert json.loads(attrs[sc.GEN_AI_INPUT_MESSAGES])[1] == {"role": "user", "parts": [
        {"type": "text", "content": "hello"}]}
    assert json.loads(attrs[sc.GEN_AI_OUTPUT_MESSAGES])[0]["finish_reason"] == "stop"
    request = fake_server.requests[-1]
    assert request["body"]["return_token_ids"] is True and request["body"]["logprobs"] is True
    trace_hex = format(span.context.trace_id, "032x")
    assert request["headers"]["traceparent"].split("-")[1] == trace_hex  # vLLM's own span would join the trace


def test_messages_are_not_recorded_unless_asked(spans, fake_server):
    _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert sc.GEN_AI_INPUT_MESSAGES not in _only_span(spans).attributes


def test_stream_chunks_reach_the_caller_unchanged(spans, fake_server):
    client = _client(fake_server)
    asked = dict(logprobs=True, extra_body={"return_token_ids": True})  # no augmentation: same request twice
    seen = [c.model_dump(exclude={"id", "created"}) for c in
            client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **asked)]
    TracetrainOpenAIInstrumentor().uninstrument()
    plain = [c.model_dump(exclude={"id", "created"}) for c in
             client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **asked)]
    assert seen == plain and len(seen) > 3
    _assert_captured(_only_span(spans), fake_server.responses[0])


def test_stream_n_choices_and_usage(spans, fake_server):
    stream = _client(fake_server).chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, n=3, stream_options={"include_usage": True})
    assert isinstance(stream, openai.Stream)  # outer instrumentations and frameworks check this
    with stream:
        chunks = list(stream)
    assert chunks[-1].usage is not None
    span = _only_span(spans)
    for choice in range(3):
        _assert_captured(span, fake_server.responses[-1], choice)
    assert span.attributes[sc.OUTPUT_CHOICE_COUNT] == 3
    assert span.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == sum(
        len(c["token_ids"]) for c in fake_server.responses[-1]["choices"])


def test_abandoned_stream_still_ends_the_span(spans, fake_server):
    stream = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
    chunks = iter(stream)
    for _ in range(3):  # the role chunk, then two chunks of three characters
        next(chunks)
    stream.close()
    span = _only_span(spans)
    full_ids = fake_server.responses[-1]["choices"][0]["token_ids"]
    assert span.end_time is not None and list(span.attributes[sc.OUTPUT_TOKEN_IDS]) == full_ids[:6]


def test_async_plain_and_stream(spans, fake_server):
    async def agent():
        client = openai.AsyncOpenAI(base_url=fake_server.base_url, api_key="EMPTY", max_retries=0)
        await client.chat.completions.create(model="tiny", messages=MESSAGES)
        stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        assert isinstance(stream, openai.AsyncStream)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(agent())
    assert chunks
    plain, streamed = sorted(spans.get_finished_spans(), key=lambda s: s.start_time)
    _assert_captured(plain, fake_server.responses[0])
    _assert_captured(streamed, fake_server.responses[1])


def test_legacy_completions(spans, fake_server):
    _client(fake_server).completions.create(model="tiny", prompt="hello")
    span = _only_span(spans)
    assert span.name == "text_completion tiny" and fake_server.requests[-1]["body"]["logprobs"] == 0
    assert list(span.attributes[sc.INPUT_TOKEN_IDS]) == [b + 3 for b in b"hello"]
    assert len(span.attributes[sc.OUTPUT_TOKEN_IDS]) == len(span.attributes[sc.OUTPUT_LOGPROBS]) > 0


def test_policy_version_from_header_then_env(spans, fake_server, monkeypatch):
    client = _client(fake_server)
    monkeypatch.setenv("TRACETRAIN_POLICY_VERSION", "4")
    client.chat.completions.create(model="tiny", messages=MESSAGES)
    fake_server.policy_version = 9
    client.chat.completions.create(model="tiny", messages=MESSAGES)
    versions = [s.attributes[sc.POLICY_VERSION] for s in sorted(spans.get_finished_spans(), key=lambda s: s.start_time)]
    assert versions == [4, 9]


def test_non_vllm_endpoint_is_retried_plain_and_remembered(spans, strict_server):
    client = _client(strict_server)
    first = client.chat.completions.create(model="tiny", messages=MESSAGES)
    second = client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert first.choices[0].message.content == second.choices[0].message.content == "You said: hello"
    bodies = [r["body"] for r in strict_server.requests]
    assert [sorted(b) for b in bodies] == [["logprobs", "messages", "model", "return_token_ids"],
                                           ["messages", "model"], ["messages", "model"]]
    for span in spans.get_finished_spans():
        assert span.attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "rejected_by_endpoint"
        assert sc.OUTPUT_TOKEN_IDS not in span.attributes and sc.OUTPUT_LOGPROBS not in span.attributes


def test_the_callers_own_bad_request_propagates(spans, strict_server):
    with pytest.raises(openai.BadRequestError):
        _client(strict_server).chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"bogus": 1})
    span = _only_span(spans)
    assert span.status.status_code is StatusCode.ERROR
    assert strict_server.base_url not in openai_capture._State.rejecting_base_urls  # not tracetrain's fields' fault


def test_capture_off_by_env(spans, fake_server, monkeypatch):
    monkeypatch.setenv("TRACETRAIN_CAPTURE_TOKEN_IDS", "false")
    _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert sorted(fake_server.requests[-1]["body"]) == ["messages", "model"]
    assert _only_span(spans).attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "capture_disabled"


def test_caller_choices_win(spans, fake_server):
    _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES, logprobs=False)
    body = fake_server.requests[-1]["body"]
    assert body["logprobs"] is False and body["return_token_ids"] is True
    attrs = _only_span(spans).attributes
    assert sc.OUTPUT_TOKEN_IDS in attrs and sc.OUTPUT_LOGPROBS not in attrs


def test_raw_response_calls_are_left_alone(spans, fake_server):
    raw = _client(fake_server).chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "You said: hello"
    assert "return_token_ids" not in fake_server.requests[-1]["body"]
    assert _only_span(spans).attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "raw_response"


def test_hosted_apis_are_not_augmented():
    assert openai_capture._is_hosted("https://api.openai.com/v1")
    assert openai_capture._is_hosted("https://my-res.openai.azure.com/openai")
    assert not openai_capture._is_hosted("http://127.0.0.1:8000/v1")


def test_without_a_recording_sdk_the_request_is_untouched(fake_server):
    instrumentor = TracetrainOpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=NoOpTracerProvider())
    try:
        _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    finally:
        instrumentor.uninstrument()
    assert sorted(fake_server.requests[-1]["body"]) == ["messages", "model"]


def test_uninstrument_restores_the_client(spans):
    from openai._base_client import SyncAPIClient

    TracetrainOpenAIInstrumentor().uninstrument()
    assert "wrapt" not in type(SyncAPIClient.__dict__["post"]).__module__


# ---------------------------------------------------------------- never raise into the agent


def _boom(*_args, **_kwargs):
    raise RuntimeError("forced failure inside tracetrain")


def test_failure_while_preparing_leaves_the_call_alone(spans, fake_server, monkeypatch):
    monkeypatch.setattr(openai_capture, "augment_request", _boom)
    reply = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert reply.choices[0].message.content == "You said: hello"
    assert sorted(fake_server.requests[-1]["body"]) == ["messages", "model"]
    assert drops.drop_counts() == {"capture_setup_failed": 1}


def test_failure_while_reading_the_response_is_a_drop(spans, fake_server, monkeypatch):
    monkeypatch.setattr(openai_capture, "capture_response", _boom)
    reply = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert reply.choices[0].message.content == "You said: hello"
    assert _only_span(spans).attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "capture_error"
    assert drops.drop_counts() == {"capture_failed": 1}


def test_failure_on_a_stream_chunk_is_a_drop(spans, fake_server, monkeypatch):
    monkeypatch.setattr(StreamAccumulator, "add", _boom)
    stream = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "You said: hello"
    assert _only_span(spans).attributes[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "capture_error"
    assert drops.drop_counts() == {"stream_chunk_failed": 1}


def test_failure_writing_the_span_is_a_drop(spans, fake_server, monkeypatch):
    from opentelemetry.sdk.trace import Span

    monkeypatch.setattr(Span, "set_attributes", _boom)
    reply = _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
    assert reply.choices[0].message.content == "You said: hello"
    assert drops.drop_counts() == {"span_update_failed": 1}
    assert _only_span(spans).end_time is not None


# ---------------------------------------------------------------- with Traceloop's instrumentation


_TRACELOOP_PROBE = """
import json, sys
import openai
from opentelemetry.instrumentation.openai import OpenAIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tracetrain.instrumentation.openai_capture import TracetrainOpenAIInstrumentor

base_url, tracetrain_first, stream = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
order = [TracetrainOpenAIInstrumentor(), OpenAIInstrumentor()]
for instrumentor in order if tracetrain_first else order[::-1]:
    instrumentor.instrument(tracer_provider=provider)
client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], stream=stream)
if stream:
    list(response)
print(json.dumps([{"name": s.name, "attributes": dict(s.attributes)} for s in exporter.get_finished_spans()]))
"""


@pytest.mark.parametrize("tracetrain_first", [True, False], ids=["tracetrain-first", "traceloop-first"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_ids_land_on_the_traceloop_span_in_any_order(fake_server, tracetrain_first, stream):
    """In a fresh process each: Traceloop's uninstrument() leaves its wrappers in place under wrapt 2."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRACELOOP_PROBE, fake_server.base_url, str(int(tracetrain_first)),
                          str(int(stream))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    finished = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in finished] == ["openai.chat"]  # no span of our own beside Traceloop's
    attrs, record = finished[0]["attributes"], fake_server.responses[-1]
    assert attrs[sc.INPUT_TOKEN_IDS] == record["prompt_token_ids"]
    assert attrs[sc.OUTPUT_TOKEN_IDS] == record["choices"][0]["token_ids"]
    assert attrs[sc.OUTPUT_LOGPROBS] == record["choices"][0]["logprobs"]
    assert attrs["gen_ai.output.messages"]  # Traceloop's own attributes are still there


def test_reward_and_episode_spans(spans, fake_server, provider):
    from tracetrain.instrumentation import emit_reward, episode

    tracer = provider[0].get_tracer("test")
    with tracer.start_as_current_span("batch") as batch:
        with episode(task_id="t-1", rollout_id=3, agent_name="calc") as opened:
            _client(fake_server).chat.completions.create(model="tiny", messages=MESSAGES)
            emit_reward(1.0, name="exact_match", source="grader")
    by_name = {s.name: s for s in spans.get_finished_spans()}
    root, chat, reward = by_name["invoke_agent calc"], by_name["chat tiny"], by_name["reward"]
    assert root.parent is None and root.context.trace_id != batch.get_span_context().trace_id
    assert root.links[0].context.span_id == batch.get_span_context().span_id
    assert dict(root.attributes) == {sc.GEN_AI_OPERATION_NAME: "invoke_agent", sc.EPISODE_ID: opened.episode_id,
                                     sc.TASK_ID: "t-1", sc.ROLLOUT_ID: "3", sc.GEN_AI_AGENT_NAME: "calc"}
    assert chat.parent.span_id == root.context.span_id == reward.parent.span_id
    assert {k: chat.attributes.get(k) for k in (sc.EPISODE_ID, sc.TASK_ID, sc.ROLLOUT_ID, sc.GEN_AI_AGENT_NAME)} == {
        sc.EPISODE_ID: opened.episode_id, sc.TASK_ID: "t-1", sc.ROLLOUT_ID: "3", sc.GEN_AI_AGENT_NAME: None}
    assert reward.attributes[sc.REWARD] == 1.0 and reward.attributes[sc.REWARD_NAME] == "exact_match"
    assert reward.attributes[sc.REWARD_SOURCE] == "grader" and reward.attributes[sc.EPISODE_ID] == opened.episode_id


def test_episode_marks_errors_and_reraises(spans):
    from tracetrain.instrumentation import episode

    with pytest.raises(KeyError):
        with episode(task_id="t"):
            raise KeyError("agent bug")
    assert _only_span(spans).status.status_code is StatusCode.ERROR


def test_bad_rewards_never_raise(spans, monkeypatch):
    from tracetrain.instrumentation import emit_reward

    emit_reward(float("nan"))
    emit_reward("not a number")
    assert spans.get_finished_spans() == () and drops.drop_counts() == {"reward_not_recorded": 2}
    monkeypatch.setenv("TRACETRAIN_EPISODE_ID", "ep-from-run")
    emit_reward(0.5)
    assert _only_span(spans).attributes[sc.EPISODE_ID] == "ep-from-run"


def test_public_api_is_lazy():
    import subprocess
    import sys

    code = ("import sys, tracetrain.instrumentation.semconv, tracetrain.instrumentation as ti;"
            "assert 'opentelemetry.trace' not in sys.modules, 'semconv must stay light';"
            "assert callable(ti.emit_reward) and callable(ti.episode)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_sdk_provider_type_is_real():
    assert isinstance(TracerProvider(), TracerProvider)  # guards the fixtures' assumption on the SDK
