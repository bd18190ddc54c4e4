"""The real OTel SDKs (Python and Node.js), configured by env vars only, land spans intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracetrain.collector.reader import query

AGENTS = Path(__file__).parent / "agents"
NODE_DIR = Path(__file__).parent / "node_exporter"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_NODE_RESOURCE_DETECTORS="env,host,os,process", OTEL_EXPORTER_OTLP_TIMEOUT="10")
    env.update(extra)
    return env


def _rows(data_dir: Path, trace_id: str) -> dict[str, dict]:
    table = query(data_dir, "SELECT * FROM spans WHERE trace_id = $1", [trace_id])
    return {row["span_id"]: row for row in table.to_pylist()}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_python_sdk_env_only(collector, data_dir, protocol):
    port = collector.grpc_port if protocol == "grpc" else collector.http_port
    env = _env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
               OTEL_SERVICE_NAME="py-env-agent", OTEL_EXPORTER_OTLP_COMPRESSION="gzip")
    out = subprocess.run([sys.executable, str(AGENTS / "python_env_agent.py"), "3"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    rows = _rows(data_dir, sent["trace_id"])
    assert set(rows) == set(sent["span_ids"])
    root = rows[sent["span_ids"][0]]
    assert root["parent_span_id"] is None and root["episode_id"] == "ep-python" and root["task_id"] == "task-7"
    assert root["service_name"] == "py-env-agent"
    assert json.loads(root["resource_attributes"])["service.name"] == "py-env-agent"
    chats = sorted((r for r in rows.values() if r["name"] == "chat tiny-model"), key=lambda r: r["input_tokens"])
    assert [c["response_token_ids"] for c in chats] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert all(c["response_logprobs"] == [-0.5, -0.25, -0.125] for c in chats)
    assert all(c["parent_span_id"] == root["span_id"] and c["kind"] == 1 for c in chats)
    assert [c["input_tokens"] for c in chats] == [10, 11, 12] and chats[0]["policy_version"] == 4
    assert json.loads(chats[1]["input_messages"])[0]["parts"][0]["content"] == "héllo ✓ 1"
    assert json.loads(chats[0]["events"])[0]["name"] == "tool.done"
    attributes = json.loads(chats[0]["attributes"])
    assert attributes["gen_ai.request.model"] == "tiny-model" and "tracetrain.output.token_ids" not in attributes
    calls = query(data_dir, "SELECT episode_id, task_id, agent_name FROM llm_calls WHERE trace_id = $1",
                  [sent["trace_id"]]).to_pylist()
    assert calls == [{"episode_id": "ep-python", "task_id": "task-7", "agent_name": "py-agent"}] * 3
    episode = query(data_dir, "SELECT reward, n_llm_calls FROM episodes WHERE episode_id = 'ep-python'").to_pylist()
    assert episode == [{"reward": 1.0, "n_llm_calls": 3}]


def test_python_sdk_sends_bearer_token(data_dir):
    from tests.conftest import make_collector

    daemon = make_collector(data_dir, auth_token="s3cret-token")
    try:
        for protocol, port in (("grpc", daemon.grpc_port), ("http/protobuf", daemon.http_port)):
            base = dict(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                        OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_SERVICE_NAME="auth-agent")
            denied = subprocess.run([sys.executable, str(AGENTS / "python_env_agent.py"), "1"],
                                    env=_env(**base), capture_output=True, text=True, timeout=60)
            assert denied.returncode == 1, f"{protocol}: export without a token must fail"
            ok = subprocess.run([sys.executable, str(AGENTS / "python_env_agent.py"), "1"],
                                env=_env(**base, OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20s3cret-token"),
                                capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            assert len(_rows(data_dir, json.loads(ok.stdout)["trace_id"])) == 3
    finally:
        daemon.stop()


def _node_ready() -> bool:
    return shutil.which("node") is not None and (NODE_DIR / "node_modules" / "@opentelemetry").is_dir()


@pytest.mark.node
@pytest.mark.skipif(os.environ.get("CI") != "true" and not _node_ready(),
                    reason="run `make node-deps` first (CI always runs this test)")
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_node_sdk_env_only(collector, data_dir, protocol):
    port = collector.grpc_port if protocol == "grpc" else collector.http_port
    env = _env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
               OTEL_SERVICE_NAME="node-agent", TT_RUN_TAG=f"node-{protocol}", OTEL_EXPORTER_OTLP_TIMEOUT="10000")
    out = subprocess.run(["node", str(NODE_DIR / "export_spans.js"), "4"], env=env, capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    rows = _rows(data_dir, sent["trace_id"])
    assert set(rows) == set(sent["span_ids"]) and len(rows) == 5
    root = rows[sent["span_ids"][0]]
    assert root["episode_id"] == f"node-{protocol}" and root["service_name"] == "node-agent"
    chats = sorted((r for r in rows.values() if r["parent_span_id"]), key=lambda r: r["input_tokens"])
    assert [c["response_token_ids"] for c in chats] == [[1, 2, 3], [1, 2, 4], [1, 2, 5], [1, 2, 6]]
    assert chats[0]["response_logprobs"] == [-0.5, -0.25, -0.125] and chats[0]["request_model"] == "tiny-model"
    assert "✓" in json.loads(chats[2]["input_messages"])[0]["parts"][0]["content"]
    assert json.loads(chats[0]["events"])[0]["name"] == "tool.done"
