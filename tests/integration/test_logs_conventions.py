"""Every recorded convention, spans and log events, through a real collector into ``llm_calls``.

The fixtures (tests/fixtures/conventions/) are what the real instrumentations sent for
the same two-turn tool-using chat; log events travel on the OTLP logs endpoints
(gRPC LogsService, HTTP /v1/logs) and are joined to their span in ``llm_calls``.
vLLM's own ``llm_request`` server spans are folded into the client's row.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from tests.conftest import make_collector
from tests.fixtures.conventions import otlp_fixtures as fx
from tests.integration.spanfactory import EXPORT_METHOD
from tracetrain.collector.compactor import remove_expired_partitions
from tracetrain.collector.reader import query

LOGS_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
RECORDED = [n for n in fx.names() if n.startswith("recorded_")]
TRANSPORTS = ["grpc", "http-protobuf", "http-json-gzip"]
SYSTEM = {"role": "system", "parts": [{"type": "text", "content": "You are a calculator agent."}]}
USER = {"role": "user", "parts": [{"type": "text", "content": "What is 6*7? Use the calculator."}]}
CALL = {"type": "tool_call", "id": "call_fake-1_0", "name": "calculator", "arguments": {"expression": "6*7"}}


def _post(port: int, path: str, body: bytes, content_type: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def send(collector, fixture: dict, transport: str) -> None:
    """Send the fixture's spans and log records the way ``transport`` says."""
    if transport == "grpc":
        with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            channel.unary_unary(EXPORT_METHOD)(fx.traces_protobuf(fixture), timeout=30)
            if fixture["logs"]:
                reply = channel.unary_unary(LOGS_METHOD)(fx.logs_protobuf(fixture), timeout=30)
                assert logs_service_pb2.ExportLogsServiceResponse.FromString(reply).partial_success.error_message == ""
        return
    for path, key, to_bytes in (("/v1/traces", "traces", fx.traces_protobuf), ("/v1/logs", "logs", fx.logs_protobuf)):
        if not fixture[key]:
            continue
        if transport == "http-protobuf":
            status, body = _post(collector.http_port, path, to_bytes(fixture), "application/x-protobuf")
        else:  # OTLP/JSON exactly as recorded (hex ids), gzipped
            status, body = _post(collector.http_port, path, gzip.compress(json.dumps(fixture[key]).encode()),
                                 "application/json", {"Content-Encoding": "gzip"})
        assert status == 200, body


def _calls(data_dir, style: str) -> list[dict]:
    rows = query(data_dir, "SELECT * FROM llm_calls WHERE episode_id = $1 ORDER BY input_tokens",
                 [f"ep-{style}"]).to_pylist()
    for row in rows:
        for column in ("input_messages", "output_messages"):
            messages = json.loads(row[column])
            for message in messages:
                message.pop("finish_reason", None)
                message["parts"] = [dict(sorted(p.items())) for p in message["parts"]]
            row[column] = messages
    return rows


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_recorded_style_gives_the_same_llm_calls(collector, data_dir, transport):
    for name in RECORDED:
        send(collector, fx.load(name), transport)
    for name in RECORDED:
        style = fx.load(name)["style"]
        calls = _calls(data_dir, style)
        assert len(calls) == 2, f"{name}: {calls}"
        first, second = calls
        assert (first["input_tokens"], second["output_tokens"]) == (117, 18), name
        assert {(c["model"], c["provider"], c["operation"], c["agent_name"], c["task_id"]) for c in calls} == {
            ("tiny", "openai", "chat", "calc-agent", "task-6x7")}, name
        assert first["input_messages"] == [SYSTEM, USER], name
        assert first["output_messages"] == [{"role": "assistant", "parts": [CALL]}], name
        tool = second["input_messages"][3]
        assert second["input_messages"][:3] == [SYSTEM, USER, {"role": "assistant", "parts": [CALL]}], name
        assert tool["role"] == "tool" and tool["parts"][0]["response"] == "42", name
        assert second["output_messages"] == [
            {"role": "assistant", "parts": [{"content": "The answer is 42.", "type": "text"}]}], name
    episodes = query(data_dir, "SELECT count(*) AS n, sum(n_llm_calls) AS calls FROM episodes").to_pylist()
    assert episodes == [{"n": len(RECORDED), "calls": 2 * len(RECORDED)}]


def test_log_records_are_stored_with_their_ids_and_bodies(collector, data_dir):
    fixture = fx.load("recorded_traceloop_legacy_events")
    send(collector, fixture, "grpc")
    rows = query(data_dir, "SELECT * FROM logs ORDER BY seq").to_pylist()
    assert [r["event_name"] for r in rows] == [
        "gen_ai.system.message", "gen_ai.user.message", "gen_ai.choice", "gen_ai.system.message",
        "gen_ai.user.message", "gen_ai.assistant.message", "gen_ai.tool.message", "gen_ai.choice"]
    assert all(len(r["trace_id"]) == 32 and len(r["span_id"]) == 16 for r in rows)
    assert json.loads(rows[0]["body"]) == {"content": "You are a calculator agent."}
    assert json.loads(rows[0]["attributes"]) == {"gen_ai.system": "openai"}
    assert rows[0]["service_name"] == "rec-traceloop-legacy-events" and rows[2]["message_direction"] == "output"


def test_structured_and_string_operation_details_are_both_accepted(collector, data_dir):
    """The contrib event sends messages as structured values; a JSON string must work the same."""
    fixture = fx.load("recorded_openai_v2_event")
    logs = fx.logs_message(fixture)
    for record in logs.resource_logs[0].scope_logs[0].log_records:
        for kv in record.attributes:
            if kv.key in ("gen_ai.input.messages", "gen_ai.output.messages"):
                as_python = json_format.MessageToDict(kv.value)
                kv.value.Clear()
                kv.value.string_value = json.dumps(_anyvalue_json(as_python))
    send(collector, {**fixture, "logs": None}, "grpc")
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        channel.unary_unary(LOGS_METHOD)(logs.SerializeToString(), timeout=30)
    first, second = _calls(data_dir, "openai-v2-event")
    assert first["input_messages"] == [SYSTEM, USER]
    assert second["output_messages"][0]["parts"][0]["content"] == "The answer is 42."
    attributes = query(data_dir, "SELECT attributes FROM logs LIMIT 1")["attributes"][0].as_py()
    assert "gen_ai.input.messages" not in json.loads(attributes)  # promoted to the message columns


def _anyvalue_json(value: dict):
    """OTLP AnyValue (as MessageToDict gives it) -> plain JSON."""
    if "kvlistValue" in value:
        return {kv["key"]: _anyvalue_json(kv.get("value", {})) for kv in value["kvlistValue"].get("values", [])}
    if "arrayValue" in value:
        return [_anyvalue_json(v) for v in value["arrayValue"].get("values", [])]
    if "intValue" in value:
        return int(value["intValue"])
    return next(iter(value.values()), None)


def test_vllm_server_spans_join_their_client_call(collector, data_dir):
    send(collector, fx.load("handmade_vllm_server"), "http-protobuf")
    calls = query(data_dir, "SELECT * FROM llm_calls ORDER BY start_time_unix_nano").to_pylist()
    assert [c["name"] for c in calls] == ["chat Qwen/Qwen2.5-0.5B-Instruct"] * 2  # no llm_request rows
    propagated, by_request_id = calls
    assert propagated["server_latency_e2e_s"] == pytest.approx(0.0456)
    assert propagated["server_time_to_first_token_s"] == pytest.approx(0.0123)
    assert propagated["server_time_in_queue_s"] == pytest.approx(0.0005)
    assert propagated["server_request_id"] == "chatcmpl-propagated"
    assert by_request_id["server_latency_e2e_s"] == pytest.approx(0.05)  # no traceparent: joined on the id
    assert query(data_dir, "SELECT count(*) AS n FROM spans WHERE name = 'llm_request'")["n"][0].as_py() == 2
    (episode,) = query(data_dir, "SELECT n_llm_calls FROM episodes WHERE episode_id = 'ep-vllm'").to_pylist()
    assert episode == {"n_llm_calls": 2}


def test_logs_endpoints_follow_the_otlp_error_rules(data_dir):
    daemon = make_collector(data_dir, auth_token="tok", max_value_bytes=1000)
    try:
        fixture = fx.load("recorded_traceloop_legacy_events")
        body = fx.logs_protobuf(fixture)
        auth = {"Authorization": "Bearer tok"}
        assert _post(daemon.http_port, "/v1/logs", body, "application/x-protobuf")[0] == 401
        assert _post(daemon.http_port, "/v1/logs", b"\xff\x00garbage", "application/x-protobuf", auth)[0] == 400
        assert _post(daemon.http_port, "/v1/logs", b"{", "application/json", auth)[0] == 400
        assert _post(daemon.http_port, "/v1/logs", body, "text/plain", auth)[0] == 415
        # one record with a 3-byte span id and one over the value limit: partial success, the rest stored
        logs = fx.logs_message(fixture)
        records = logs.resource_logs[0].scope_logs[0].log_records
        records[0].span_id = b"abc"
        records[1].body.string_value = "x" * 2000
        status, reply = _post(daemon.http_port, "/v1/logs", logs.SerializeToString(), "application/x-protobuf", auth)
        partial = logs_service_pb2.ExportLogsServiceResponse.FromString(reply).partial_success
        assert status == 200 and partial.rejected_log_records == 2 and "span_id" in partial.error_message
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            export = channel.unary_unary(LOGS_METHOD)
            with pytest.raises(grpc.RpcError) as denied:
                export(body, timeout=10)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as bad:
                export(b"\xff\x00garbage", timeout=10, metadata=[("authorization", "Bearer tok")])
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            export(body, timeout=10, metadata=[("authorization", "Bearer tok")])
        metrics = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{daemon.http_port}/metrics", headers=auth), timeout=10).read().decode()
        assert "tracetrain_log_records_accepted_total 14.0" in metrics
        assert "tracetrain_log_records_rejected_total 2.0" in metrics
    finally:
        daemon.stop()
    assert query(data_dir, "SELECT count(*) AS n FROM logs")["n"][0].as_py() == 14


def test_logs_survive_a_restart_without_file_name_clashes(data_dir):
    """Spans and logs share the writer's sequence numbers: a restarted writer must not reuse one."""
    fixture = fx.load("recorded_traceloop_legacy_events")
    for _ in range(2):
        daemon = make_collector(data_dir, writer_id="w0")
        try:
            send(daemon, fixture, "grpc")
        finally:
            daemon.stop()
    counts = query(data_dir, "SELECT (SELECT count(*) FROM logs) AS logs, (SELECT count(*) FROM spans) AS spans")
    # the second run's spans are retried duplicates (dropped by the restart dedup); its logs are new files
    assert counts.to_pylist() == [{"logs": 16, "spans": 3}]
    calls = _calls(data_dir, "traceloop-legacy-events")  # duplicates of the log events are counted once
    assert len(calls) == 2 and len(calls[1]["input_messages"]) == 4


def test_log_files_are_compacted_and_expire_like_span_files(collector, data_dir):
    fixture = fx.load("recorded_traceloop_legacy_events")
    for _ in range(3):  # the same records three times: three files, one record each after compaction
        send(collector, {**fixture, "traces": {"resourceSpans": []}}, "grpc")
    partitions = [p for p in (data_dir / "logs").glob("date=*/service=*") if "_schema" not in str(p)]
    assert len(partitions) == 1 and len(list(partitions[0].glob("part-*.parquet"))) == 3
    collector.compactor.min_age_s, collector.compactor.min_files = 0, 2
    assert collector.compactor.run_once() == 3
    assert [f.name[:8] for f in partitions[0].glob("*.parquet")] == ["compact-"]
    assert query(data_dir, "SELECT count(*) AS n FROM logs")["n"][0].as_py() == 8
    removed = remove_expired_partitions(data_dir, 0, today=dt.date(2999, 1, 1))
    assert partitions[0].parent in removed
    assert query(data_dir, "SELECT count(*) AS n FROM logs")["n"][0].as_py() == 0
