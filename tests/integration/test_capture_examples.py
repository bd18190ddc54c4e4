"""Zero-code capture end to end: the example agents, unchanged, through `tracetrain run` and plain
`opentelemetry-instrument`, against the fake vLLM server, into a real collector; asserted on `llm_calls`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracetrain.collector.reader import query
from tracetrain.instrumentation import semconv as sc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OPENAI_AGENT = str(ROOT / "examples" / "openai_agent.py")
LANGCHAIN_AGENT = str(ROOT / "examples" / "langchain_agent.py")
TASK, ANSWER = "What is 12*7+3?", "The answer is 87."


def load_fake_server_module():
    spec = importlib.util.spec_from_file_location("fake_vllm_server", ROOT / "examples" / "fake_vllm_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_server():
    server = load_fake_server_module().FakeVllmServer(port=0, policy_version=5).start()
    yield server
    server.stop()


def agent_env(server, **extra: str) -> dict[str, str]:
    """The agent's environment: the caller's, minus any OTel/tracetrain settings, plus the endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACETRAIN_"))}
    env.update(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="EMPTY", OTEL_EXPORTER_OTLP_TIMEOUT="10")
    env.update(extra)
    return env


def tracetrain_run(collector, server, agent: list[str], *flags: str, **env: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "tracetrain"), "run", "--collector", f"http://127.0.0.1:{collector.grpc_port}", *flags,
               "--", sys.executable, *agent]
    return subprocess.run(command, env=agent_env(server, **env), capture_output=True, text=True, timeout=120)


def llm_calls(data_dir: Path, service: str) -> list[dict]:
    return query(data_dir, "SELECT * FROM llm_calls WHERE service_name = $1 ORDER BY start_time_unix_nano",
                 [service]).to_pylist()


def assert_rows_match_server(rows: list[dict], server) -> None:
    """Each call's ids and logprobs are exactly what the server returned, in order."""
    assert len(rows) == len(server.responses)
    for row, sent in zip(rows, server.responses, strict=True):
        assert row["prompt_token_ids"] == sent["prompt_token_ids"]
        assert row["response_token_ids"] == sent["choices"][0]["token_ids"]
        assert row["response_logprobs"] == sent["choices"][0]["logprobs"]
        assert row["model"] == "tiny" and row["policy_version"] == 5
        assert row["response_id"] == sent["id"]


@pytest.mark.parametrize("mode", [[], ["--stream"], ["--async", "--stream"]], ids=["plain", "stream", "async-stream"])
def test_openai_agent_through_tracetrain_run(collector, data_dir, fake_server, mode):
    service = "oa-" + "-".join(m.strip("-") for m in mode or ["plain"])
    out = tracetrain_run(collector, fake_server, [OPENAI_AGENT, *mode, TASK], "--service-name", service,
                         "--task-id", "mul-12-7", "--episode-id", f"ep-{service}", "--rollout-id", "r-0",
                         "--agent-name", "calc-agent")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ANSWER
    rows = llm_calls(data_dir, service)
    assert len(rows) == 2  # a tool call, then the answer
    assert_rows_match_server(rows, fake_server)
    for row in rows:
        assert row["name"] == "openai.chat"  # Traceloop's span carries the ids; no second span of ours
        assert (row["episode_id"], row["task_id"], row["rollout_id"], row["agent_name"]) == (
            f"ep-{service}", "mul-12-7", "r-0", "calc-agent")
        assert json.loads(row["input_messages"])[-1]["role"] in ("user", "tool")  # content captured by default
    assert all(r["body"]["return_token_ids"] is True and r["body"]["logprobs"] is True for r in fake_server.requests)
    episode = query(data_dir, "SELECT task_id, n_llm_calls FROM episodes WHERE episode_id = $1",
                    [f"ep-{service}"]).to_pylist()
    assert episode == [{"task_id": "mul-12-7", "n_llm_calls": 2}]


def test_plain_opentelemetry_instrument_with_env_only(collector, data_dir, fake_server):
    """`pip install tracetrain opentelemetry-instrumentation-openai`, then only OTEL_* variables."""
    env = agent_env(fake_server, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.grpc_port}",
                    OTEL_SERVICE_NAME="oa-env-only", OTEL_RESOURCE_ATTRIBUTES="tracetrain.task.id=t-env")
    out = subprocess.run([str(BIN / "opentelemetry-instrument"), sys.executable, OPENAI_AGENT, TASK], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ANSWER
    rows = llm_calls(data_dir, "oa-env-only")
    assert_rows_match_server(rows, fake_server)
    assert {r["task_id"] for r in rows} == {"t-env"}


def test_n_choices_are_all_recorded(collector, data_dir, fake_server):
    out = tracetrain_run(collector, fake_server, [OPENAI_AGENT, "--n", "3", TASK], "--service-name", "oa-n3")
    assert out.returncode == 0, out.stderr
    rows = llm_calls(data_dir, "oa-n3")
    assert_rows_match_server(rows, fake_server)
    for row, sent in zip(rows, fake_server.responses, strict=True):
        attributes = json.loads(row["attributes"])
        assert attributes[sc.OUTPUT_CHOICE_COUNT] == 3
        for index in (1, 2):
            assert attributes[sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=index)] == \
                sent["choices"][index]["token_ids"]
            assert attributes[sc.OUTPUT_CHOICE_LOGPROBS_TEMPLATE.format(index=index)] == \
                sent["choices"][index]["logprobs"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_langchain_agent_through_tracetrain_run(collector, data_dir, fake_server, stream):
    service = f"lc-{'stream' if stream else 'plain'}"
    out = tracetrain_run(collector, fake_server, [LANGCHAIN_AGENT, *(["--stream"] if stream else []), "What is 6*7?"],
                         "--service-name", service, "--task-id", "mul-6-7", "--agent-name", "lc-agent")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The answer is 42."
    rows = llm_calls(data_dir, service)
    assert len(rows) == 2
    assert_rows_match_server(rows, fake_server)
    assert {(r["task_id"], r["agent_name"]) for r in rows} == {("mul-6-7", "lc-agent")}


EPISODES_AGENT = '''
import os, openai
from tracetrain.instrumentation import emit_reward, episode

client = openai.OpenAI()
for task, expected in (("What is 2*3?", "The answer is 6."), ("What is 5+5?", "The answer is 11.")):
    with episode(task_id=task, episode_id="ep-" + task[8:11], agent_name="multi"):
        messages = [{"role": "user", "content": task}]
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=[{"type": "function",
            "function": {"name": "calc", "parameters": {"type": "object"}}}]).choices[0].message
        messages += [reply.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": str(eval(task[8:11]))}]
        answer = client.chat.completions.create(model="tiny", messages=messages).choices[0].message.content
        emit_reward(1.0 if answer == expected else 0.0, name="exact_match")
print("done")
'''


def test_many_episodes_in_one_process(collector, data_dir, fake_server, tmp_path):
    """episode() under `tracetrain run`: each episode's calls get its id, not the run-wide one."""
    script = tmp_path / "episodes_agent.py"
    script.write_text(EPISODES_AGENT)
    out = tracetrain_run(collector, fake_server, [str(script)], "--service-name", "multi-episode")
    assert out.returncode == 0, out.stderr
    rows = llm_calls(data_dir, "multi-episode")
    assert_rows_match_server(rows, fake_server)
    assert [r["episode_id"] for r in rows] == ["ep-2*3", "ep-2*3", "ep-5+5", "ep-5+5"]
    assert {r["agent_name"] for r in rows} == {"multi"}
    episodes = query(data_dir, "SELECT episode_id, task_id, reward, n_llm_calls FROM episodes "
                               "WHERE service_name = 'multi-episode' ORDER BY episode_id").to_pylist()
    assert episodes == [{"episode_id": "ep-2*3", "task_id": "What is 2*3?", "reward": 1.0, "n_llm_calls": 2},
                        {"episode_id": "ep-5+5", "task_id": "What is 5+5?", "reward": 0.0, "n_llm_calls": 2}]


def test_agent_with_ids_on_its_root_spans_keeps_its_episodes(collector, data_dir, fake_server):
    """An agent that puts episode ids on its own root spans only, run under `tracetrain run`."""
    out = tracetrain_run(collector, fake_server, [str(ROOT / "examples" / "sample_agent.py"), "--episodes", "2"],
                         "--service-name", "sample-under-run")
    assert out.returncode == 0, out.stderr
    episodes = query(data_dir, "SELECT episode_id FROM llm_calls WHERE service_name = 'sample-under-run' "
                               "GROUP BY episode_id ORDER BY episode_id").to_pylist()
    assert [e["episode_id"] for e in episodes] == ["ep-0000", "ep-0001"]
