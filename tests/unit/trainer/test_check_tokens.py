"""`tracetrain check-tokens` against a real collector store and a tokenizer built offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracetrain.collector.cli import main
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer.check_tokens import check_call, compare_ids

transformers = pytest.importorskip(
    "transformers", reason="check-tokens tests need the trainer extra: pip install -e '.[trainer]'")

from tests.integration.fake_upstream import HFTokenizer, build_tiny_tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "calc", "description": "evaluate",
                                           "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tok(model_dir) -> HFTokenizer:
    return HFTokenizer(model_dir)


def _otel(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def _chat_span(tok: HFTokenizer, name: str, otel_messages: list, openai_messages: list, reply: str,
               tools: list | None = None) -> dict:
    """Attributes of a chat span whose ids are what a vLLM with this tokenizer would have captured."""
    attributes = {
        sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: "tiny-model",
        sc.GEN_AI_INPUT_MESSAGES: json.dumps(otel_messages),
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([{**_otel("assistant", reply), "finish_reason": "stop"}]),
        sc.INPUT_TOKEN_IDS: tok.render(openai_messages, tools),
        sc.OUTPUT_TOKEN_IDS: tok.encode(reply) + [tok.eos_id],
        "name": name,
    }
    if tools:
        attributes["gen_ai.tool.definitions"] = json.dumps([{"type": "function", **t["function"]} for t in tools])
    return attributes


def _non_canonical(tok: HFTokenizer, ids: list[int], at: int) -> list[int]:
    """The same text with the merged token at ``at`` split into single characters: real drift."""
    pieces = [tok.tokenizer.convert_tokens_to_ids(ch) for ch in tok.tokenizer.convert_ids_to_tokens(ids[at])]
    assert len(pieces) > 1 and tok.decode(pieces) == tok.decode([ids[at]])
    return ids[:at] + pieces + ids[at + 1:]


def _emit(collector, spans: list[dict]) -> dict[str, str]:
    """Send the spans with the real OTel SDK exporter; returns span name -> span id."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "check-tokens-test"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{collector.grpc_port}", insecure=True)))
    tracer = provider.get_tracer("test")
    ids = {}
    with tracer.start_as_current_span("invoke_agent calc", attributes={sc.EPISODE_ID: "ep-tok"}):
        for attributes in spans:
            attributes = dict(attributes)
            name = attributes.pop("name")
            with tracer.start_as_current_span(name, attributes=attributes) as span:
                ids[name] = format(span.get_span_context().span_id, "016x")
    provider.shutdown()
    return ids


@pytest.fixture
def store(collector, data_dir, tok) -> tuple[Path, dict[str, str], int]:
    """Four captured calls, three faithful and one whose prompt ids drifted at a known token."""
    system, user = "You are a careful calculator agent.", "What is 6 * 7?"
    plain = _chat_span(tok, "chat plain", [_otel("system", system), _otel("user", user)],
                       [{"role": "system", "content": system}, {"role": "user", "content": user}], "The answer is 42.")
    call = {"id": "call-1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "6*7"}'}}
    tool_history = [{"role": "user", "content": user}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call-1", "content": "42"}]
    tooled = _chat_span(tok, "chat tools", [
        _otel("user", user),
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call-1", "name": "calc",
                                         "arguments": {"expression": "6*7"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call-1", "response": "42"}]},
    ], tool_history, "The answer is 42.", tools=TOOLS)
    completion = {sc.GEN_AI_OPERATION_NAME: "text_completion", sc.GEN_AI_REQUEST_MODEL: "tiny-model",
                  sc.GEN_AI_INPUT_MESSAGES: json.dumps([_otel("user", "hello world")]),
                  sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([{**_otel("assistant", " The answer"),
                                                          "finish_reason": "length"}]),
                  sc.INPUT_TOKEN_IDS: tok.encode("hello world", special=True),
                  sc.OUTPUT_TOKEN_IDS: tok.encode(" The answer"), "name": "text_completion tiny-model"}
    drifted = _chat_span(tok, "chat drifted", [_otel("user", user)], [{"role": "user", "content": user}], "42")
    position = next(i for i, t in enumerate(drifted[sc.INPUT_TOKEN_IDS]) if len(tok.decode([t])) > 1)
    drifted[sc.INPUT_TOKEN_IDS] = _non_canonical(tok, drifted[sc.INPUT_TOKEN_IDS], position)
    return data_dir, _emit(collector, [plain, tooled, completion, drifted]), position


def _run(*args: str):
    return CliRunner().invoke(main, ["check-tokens", *args], catch_exceptions=False)


def test_reports_the_drifted_call_and_exits_1(store, model_dir, tok):
    data_dir, ids, position = store
    result = _run("--data", str(data_dir), "--model", str(model_dir))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2, result.output  # one mismatch line, one summary
    assert lines[0].startswith("MISMATCH") and ids["chat drifted"] in lines[0]
    assert f"prompt: first difference at token {position} " in lines[0]
    assert f"response: {len(tok.encode('42'))} ids match" in lines[0]
    assert lines[1] == ("check-tokens: 4 calls, 3 match, 1 mismatch (prompts 3/4 match, responses 4/4 match, "
                        "0 checks skipped)")


def test_where_limit_and_all(store, model_dir):
    data_dir, ids, _ = store
    result = _run("--data", str(data_dir), "--model", str(model_dir), "--where", "name <> 'chat drifted'", "--all")
    assert result.exit_code == 0, result.output
    ok_lines = [line for line in result.output.splitlines() if line.startswith("ok")]
    assert len(ok_lines) == 3 and all("ids match" in line for line in ok_lines)
    assert "chat tools" in result.output and "episode" not in result.output
    limited = _run("--data", str(data_dir), "--model", str(model_dir), "--limit", "1",
                   "--where", "episode_id = 'ep-tok' AND agent_name IS NULL")
    assert limited.exit_code == 0 and "check-tokens: 1 calls, 1 match" in limited.output


def test_json_format(store, model_dir):
    data_dir, ids, position = store
    result = CliRunner().invoke(main, ["check-tokens", "--data", str(data_dir), "--model", str(model_dir),
                                       "--format", "json"])
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_span = {row["span_id"]: row for row in rows}
    assert by_span[ids["chat drifted"]]["prompt"]["first_difference"] == position
    assert by_span[ids["chat drifted"]]["mismatch"] is True
    assert sum(row["mismatch"] for row in rows) == 1 and len(rows) == 4


def test_response_drift_and_skips(tok):
    reply = "The answer is 42."
    canonical = tok.encode(reply) + [tok.eos_id]
    at = next(i for i, t in enumerate(canonical) if len(tok.decode([t])) > 1)
    row = {sc.COL_TRACE_ID: "t", sc.COL_SPAN_ID: "s", sc.COL_NAME: "chat", "operation": "chat",
           sc.COL_INPUT_MESSAGES: json.dumps([_otel("user", "hi")]), sc.COL_SYSTEM_INSTRUCTIONS: None,
           sc.COL_ATTRIBUTES: "{}", sc.COL_PROMPT_TOKEN_IDS: tok.render([{"role": "user", "content": "hi"}], None),
           sc.COL_OUTPUT_MESSAGES: json.dumps([_otel("assistant", reply)]),
           sc.COL_RESPONSE_TOKEN_IDS: _non_canonical(tok, canonical, at)}
    check = check_call(row, tok.tokenizer, {})
    assert check.prompt.match and not check.response.match and check.response.first_difference == at
    row[sc.COL_OUTPUT_MESSAGES] = json.dumps([{"role": "assistant", "parts": [
        {"type": "tool_call", "id": "c", "name": "calc", "arguments": {}}]}])
    check = check_call(row, tok.tokenizer, {})
    assert check.response is None and check.skipped == ["response: tool call (the server parsed it out of the text)"]


def test_compare_ids():
    assert compare_ids([1, 2, 3], [1, 2, 3]).match
    diff = compare_ids(list(range(20)), list(range(10)) + [99] + list(range(11, 20)))
    assert diff.first_difference == 10 and diff.captured_window == [6, 7, 8, 9, 10, 11, 12, 13]
    assert compare_ids([1, 2], [1, 2, 3]).first_difference == 2


def test_errors_exit_2(tmp_path, store, model_dir, monkeypatch):
    not_a_store = _run("--data", str(tmp_path / "nothing"), "--model", str(model_dir))
    assert not_a_store.exit_code == 2 and "not a tracetrain span store" in not_a_store.output
    no_model = _run("--data", str(store[0]), "--model", str(tmp_path / "no-model"))
    assert no_model.exit_code == 2 and "is not a directory" in no_model.output
    bad_sql = _run("--data", str(store[0]), "--model", str(model_dir), "--where", "no_such_column = 1")
    assert bad_sql.exit_code == 2 and "cannot read calls" in bad_sql.output
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the trainer extra were not installed
    missing = _run("--data", str(store[0]), "--model", str(model_dir))
    assert missing.exit_code == 2 and "pip install 'tracetrain[trainer]'" in missing.output


def test_empty_store_is_not_an_error(collector, data_dir, model_dir):
    result = _run("--data", str(data_dir), "--model", str(model_dir))
    assert result.exit_code == 0 and "no captured calls" in result.output
