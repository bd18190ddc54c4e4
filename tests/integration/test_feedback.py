"""Delayed rewards: POST /v1/rewards, gRPC FeedbackService/AddReward and `tracetrain reward`."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.conftest import make_collector
from tests.integration.spanfactory import EXPORT_METHOD
from tracetrain.collector import feedback_proto
from tracetrain.collector.feedback import _reward_request, reward_span_ids
from tracetrain.collector.feedback_cli import reward_command
from tracetrain.collector.reader import query

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000_000_000
TRACE = bytes.fromhex("5a" * 16)


def _kv(key: str, value) -> common_pb2.KeyValue:
    if isinstance(value, float):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(double_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _export_episode(port: int, episode: str | None = "ep-1", trace_id: bytes = TRACE) -> None:
    """An agent root span (with the episode id) and an inline reward span, 0.25 at T0 + 2 s."""
    root_attrs = [_kv("tracetrain.episode.id", episode)] if episode else []
    spans = [trace_pb2.Span(trace_id=trace_id, span_id=b"\x01" * 8, name="agent", kind=1,
                            start_time_unix_nano=T0, end_time_unix_nano=T0 + 3 * 10**9, attributes=root_attrs),
             trace_pb2.Span(trace_id=trace_id, span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8, name="reward",
                            kind=1, start_time_unix_nano=T0 + 2 * 10**9, end_time_unix_nano=T0 + 2 * 10**9,
                            attributes=[_kv("tracetrain.reward", 0.25)])]
    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[_kv("service.name", "agent-svc")]),
        scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.unary_unary(EXPORT_METHOD)(request.SerializeToString(), timeout=10)


def _post(port: int, payload, token: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rewards", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _episode(data_dir, episode_id: str = "ep-1") -> dict:
    (row,) = query(data_dir, "SELECT * FROM episodes WHERE episode_id = $1", [episode_id]).to_pylist()
    return row


def test_http_reward_is_durable_idempotent_and_wins_by_time(collector, data_dir):
    _export_episode(collector.grpc_port)
    before = _episode(data_dir)
    status, body = _post(collector.http_port, {"episode_id": "nope", "value": 1.0})
    assert status == 404 and body["code"] == 5 and "nope" in body["message"]

    payload = {"episode_id": "ep-1", "value": 1.0, "name": "user_feedback", "reward_id": "r-1",
               "attributes": {"comment": "great", "stars": 5}}
    assert _post(collector.http_port, payload) == (200, {"accepted": True, "duplicate": False, "reward_id": "r-1"})
    after = _episode(data_dir)  # visible as soon as acknowledged
    assert (after["reward"], after["reward_sum"], after["n_rewards"], after["n_delayed_rewards"]) == (
        1.0, 1.25, 2, 1)
    for column in ("n_spans", "start_time_unix_nano", "end_time_unix_nano", "service_name", "trace_ids"):
        assert after[column] == before[column], column  # the reward span does not stretch the episode

    assert _post(collector.http_port, payload) == (200, {"accepted": True, "duplicate": True, "reward_id": "r-1"})
    assert _episode(data_dir)["n_rewards"] == 2
    status, body = _post(collector.http_port, {**payload, "value": 0.0})
    assert status == 409 and "r-1" in body["message"]

    (span,) = query(data_dir, "SELECT * FROM spans WHERE scope_name = 'tracetrain.feedback'").to_pylist()
    attributes = json.loads(span["attributes"])
    assert (span["name"], span["episode_id"], span["reward"]) == ("reward", "ep-1", 1.0)
    assert attributes["tracetrain.reward.id"] == "r-1" and attributes["tracetrain.reward.delayed"] is True
    assert attributes["tracetrain.reward.name"] == "user_feedback" and attributes["stars"] == 5
    trace_id, span_id = reward_span_ids("r-1")
    assert (span["trace_id"], span["span_id"]) == (trace_id.hex(), span_id.hex())

    # an older feedback time loses to the inline reward (latest by time wins)
    old = {"episode_id": "ep-1", "value": -1.0, "reward_id": "r-old", "time_unix_nano": T0 + 10**9}
    assert _post(collector.http_port, old)[0] == 200
    assert (_episode(data_dir)["reward"], _episode(data_dir)["n_rewards"]) == (1.0, 3)


@pytest.mark.parametrize("payload, message", [
    ({"episode_id": "ep-1"}, "value is required"),
    ({"episode_id": "ep-1", "value": "high"}, "finite number"),
    ({"episode_id": "ep-1", "value": True}, "finite number"),
    ({"value": 1.0}, "episode_id is required"),
    ({"episode_id": "ep-1", "value": 1.0, "colour": "red"}, "unknown fields"),
    ({"episode_id": "ep-1", "value": 1.0, "attributes": [1]}, "attributes must be an object"),
    ({"episode_id": "ep-1", "value": 1.0, "reward_id": "x" * 300}, "longer than"),
    ([1, 2], "JSON object"),
])
def test_http_reward_rejects_bad_requests(collector, payload, message):
    _export_episode(collector.grpc_port)
    status, body = _post(collector.http_port, payload)
    assert status == 400 and message in body["message"]
    status, body = _post(collector.http_port, None, raw=b'{"episode_id": "ep-1", "value": NaN}')
    assert status == 400 and "finite" in body["message"]


def test_grpc_add_reward_and_auth(data_dir):
    daemon = make_collector(data_dir, auth_token="tok")
    meta = [("authorization", "Bearer tok")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            channel.unary_unary(EXPORT_METHOD)(_episode_bytes(), timeout=10, metadata=meta)
            add = channel.unary_unary(feedback_proto.ADD_REWARD_METHOD,
                                      request_serializer=feedback_proto.AddRewardRequest.SerializeToString,
                                      response_deserializer=feedback_proto.AddRewardResponse.FromString)
            request = feedback_proto.AddRewardRequest(episode_id="ep-1", value=0.0, name="grader", reward_id="g-1")
            request.attributes.update({"grader": "unit_tests"})
            for call, code in ((lambda: add(request, timeout=10), grpc.StatusCode.UNAUTHENTICATED),
                               (lambda: add(feedback_proto.AddRewardRequest(episode_id="zz", value=1.0), timeout=10,
                                            metadata=meta), grpc.StatusCode.NOT_FOUND),
                               (lambda: add(feedback_proto.AddRewardRequest(episode_id="ep-1"), timeout=10,
                                            metadata=meta), grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == code
            first = add(request, timeout=10, metadata=meta)
            again = add(request, timeout=10, metadata=meta)
            assert (first.accepted, first.duplicate, again.duplicate, again.reward_id) == (True, False, True, "g-1")
            generated = add(feedback_proto.AddRewardRequest(episode_id="ep-1", value=2.0), timeout=10, metadata=meta)
            assert re.fullmatch(r"[0-9a-f]{32}", generated.reward_id)
        assert _post(daemon.http_port, {"episode_id": "ep-1", "value": 1.0})[0] == 401
    finally:
        daemon.stop()
    episode = _episode(data_dir)
    assert (episode["reward"], episode["n_rewards"], episode["n_delayed_rewards"]) == (2.0, 2, 2)
    (attributes,) = query(data_dir, "SELECT attributes FROM spans WHERE span_id = $1",
                          [reward_span_ids("g-1")[1].hex()])["attributes"].to_pylist()
    assert json.loads(attributes)["grader"] == "unit_tests"


def _episode_bytes() -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span(
            trace_id=TRACE, span_id=b"\x01" * 8, name="agent", start_time_unix_nano=T0, end_time_unix_nano=T0 + 1,
            attributes=[_kv("tracetrain.episode.id", "ep-1")])])])])
    return request.SerializeToString()


def test_cli_reward(collector, data_dir):
    _export_episode(collector.grpc_port, episode=None)  # the episode is its trace id
    url = f"http://127.0.0.1:{collector.http_port}"
    runner = CliRunner()
    result = runner.invoke(reward_command, ["--collector", url, "--episode", TRACE.hex(), "--value", "0.5",
                                            "--name", "user_feedback", "--reward-id", "cli-1", "--attr", "stars=4",
                                            "--attr", "note=fine"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"accepted": True, "duplicate": False, "reward_id": "cli-1"}
    again = runner.invoke(reward_command, ["--collector", url, "--episode", TRACE.hex(), "--value", "0.5",
                                           "--reward-id", "cli-1"])
    assert again.exit_code == 0 and json.loads(again.output)["duplicate"] is True
    missing = runner.invoke(reward_command, ["--collector", url, "--episode", "ep-missing", "--value", "1"])
    assert missing.exit_code == 1 and "HTTP 404" in missing.output and "ep-missing" in missing.output
    episode = _episode(data_dir, TRACE.hex())
    assert (episode["reward"], episode["n_rewards"]) == (0.5, 2)
    span = query(data_dir, "SELECT attributes FROM spans WHERE scope_name = 'tracetrain.feedback'")
    assert json.loads(span["attributes"][0].as_py())["stars"] == 4


def test_retry_after_restart_and_duplicate_rows_count_once(data_dir):
    daemon = make_collector(data_dir)
    try:
        _export_episode(daemon.grpc_port)
        assert _post(daemon.http_port, {"episode_id": "ep-1", "value": 0.75, "reward_id": "r-9"})[0] == 200
    finally:
        daemon.stop()
    daemon = make_collector(data_dir, writer_id="w1")  # another daemon knows the reward only from the store
    try:
        status, body = _post(daemon.http_port, {"episode_id": "ep-1", "value": 0.75, "reward_id": "r-9"})
        assert (status, body["duplicate"]) == (200, True)
        # two daemons racing could both store it: the same span twice must still count once
        trace_id, span_id = reward_span_ids("r-9")
        copy = _reward_request("ep-1", 0.75, None, "r-9", {}, T0 + 10**12, trace_id, span_id)
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            channel.unary_unary(EXPORT_METHOD)(copy, timeout=10)
    finally:
        daemon.stop()
    assert query(data_dir, "SELECT count(*) AS n FROM spans WHERE span_id = $1",
                 [span_id.hex()])["n"][0].as_py() == 2
    episode = _episode(data_dir)
    assert (episode["reward"], episode["n_rewards"], episode["reward_sum"]) == (0.75, 2, 1.0)


def test_feedback_proto_file_matches_the_runtime_descriptor():
    """proto/tracetrain/v1/feedback.proto and collector/feedback_proto.py declare the same thing."""
    text = re.sub(r"//[^\n]*", "", (ROOT / "proto" / "tracetrain" / "v1" / "feedback.proto").read_text())
    assert re.search(r'^\s*package\s+tracetrain\.v1\s*;', text, re.M)
    messages = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{([^}]*)\}", text):
        messages[name] = sorted(re.findall(r"(optional\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", body))
    types = {1: "double", 8: "bool", 9: "string", 11: None, 6: "fixed64"}
    expected = {}
    for name, fields in feedback_proto.MESSAGES.items():
        expected[name] = sorted(
            ("optional " if optional else "", types[type_] or type_name.lstrip("."), field, str(number))
            for field, number, type_, type_name, optional in fields)
    assert messages == expected
    rpcs = re.findall(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(\w+)\s*\)", text)
    assert {name: (req, resp) for name, req, resp in rpcs} == feedback_proto.METHODS
    assert re.search(r"service\s+FeedbackService\s*\{", text)
