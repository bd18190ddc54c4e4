"""examples/node_agent: a Node.js agent (OTel JS SDK + fetch) through `tracetrain proxy`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_proxy import _calls, make_proxy, proxy, upstream  # noqa: F401 - fixtures
from tracetrain.collector.reader import query

AGENT_DIR = Path(__file__).resolve().parents[2] / "examples" / "node_agent"


def _node_ready() -> bool:
    return shutil.which("node") is not None and (AGENT_DIR / "node_modules" / "@opentelemetry").is_dir()


@pytest.mark.node
@pytest.mark.skipif(os.environ.get("CI") != "true" and not _node_ready(),
                    reason="run `make node-deps` first (npm ci in examples/node_agent; CI always runs this test)")
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_node_agent_through_the_proxy(collector, data_dir, upstream, proxy, protocol):  # noqa: F811
    port = collector.grpc_port if protocol == "grpc" else collector.http_port
    episode = f"ep-node-{protocol.replace('/', '-')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
               OTEL_SERVICE_NAME="node-agent", OTEL_NODE_RESOURCE_DETECTORS="env,host,os,process",
               TRACETRAIN_PROXY_URL=proxy.url + "/v1", AGENT_EPISODE_ID=episode, AGENT_TASK_ID="mul-6-7")
    out = subprocess.run(["node", str(AGENT_DIR / "agent.js")], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["answer"] == "The answer is 42." and result["reward"] == 1.0 and result["exported"] == 3

    calls = _calls(proxy, data_dir)
    assert len(calls) == 2 and len(upstream.calls) == 2
    root = query(data_dir, "SELECT span_id FROM spans WHERE trace_id = $1 AND parent_span_id IS NULL",
                 [result["trace_id"]]).to_pylist()
    for call, sent in zip(calls, upstream.calls):
        assert call["trace_id"] == result["trace_id"] and call["parent_span_id"] == root[0]["span_id"]
        assert call["prompt_token_ids"] == sent["prompt_token_ids"]
        assert call["response_token_ids"] == sent["choices"][0]["token_ids"]
        assert call["response_logprobs"] == sent["choices"][0]["logprobs"]
        assert (call["episode_id"], call["task_id"], call["agent_name"]) == (episode, "mul-6-7", "node-agent")
    assert [sent["request"].get("stream", False) for sent in upstream.calls] == [False, True]
    second_input = json.loads(calls[1]["input_messages"])
    assert [m["role"] for m in second_input] == ["system", "user", "assistant", "tool"]
    assert second_input[3]["parts"] == [{"type": "tool_call_response", "id": "call-0", "response": "42"}]
    tool = query(data_dir, "SELECT parent_span_id FROM spans WHERE trace_id = $1 AND name = 'execute_tool calc'",
                 [result["trace_id"]]).to_pylist()
    assert tool == [{"parent_span_id": root[0]["span_id"]}]
    episodes = query(data_dir, "SELECT reward, n_llm_calls, agent_name, task_id FROM episodes WHERE episode_id = $1",
                     [episode]).to_pylist()
    assert episodes == [{"reward": 1.0, "n_llm_calls": 2, "agent_name": "node-agent", "task_id": "mul-6-7"}]
