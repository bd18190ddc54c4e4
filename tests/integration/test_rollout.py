"""`tracetrain rollout` end to end: a real collector, the fake vLLM server, agents in all three shapes.

Asserted on the store: each episode with its task / rollout ids, LLM calls, grader or own
reward; crashed, raising and hung runs are error episodes and the others still succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.integration.test_capture_examples import load_fake_server_module
from tests.integration.test_proxy import _calls, make_proxy, proxy, upstream  # noqa: F401 - fixtures
from tracetrain.collector.reader import query
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer.cli_rollout import rollout_command
from tracetrain.trainer.rollout import CommandAgent, RolloutError, run_rollouts
from tracetrain.trainer.rollout_agents import parse_result_line

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AGENT = ROOT / "tests" / "integration" / "agents" / "rollout_test_agent.py"
GRADER = f"{ROOT / 'examples' / 'rollout_agent.py'}:grade"
CALC = [{"id": f"calc-{a}-{b}", "prompt": f"What is {a}*{b}?", "answer": str(a * b)} for a, b in
        ((2, 3), (4, 5), (6, 7), (8, 9))]


@pytest.fixture
def fake_server():
    server = load_fake_server_module().FakeVllmServer(port=0).start()
    yield server
    server.stop()


def rollout(tmp_path: Path, collector, server, tasks: list[dict], *flags: str, **extra_env: str) -> tuple[dict, list]:
    """Run the CLI in a fresh process (capture configures OpenTelemetry globally); (summary, --out rows)."""
    tasks_file, out_file = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACETRAIN_"))}
    env.update(OPENAI_BASE_URL=getattr(server, "base_url", ""), OPENAI_API_KEY="EMPTY", OTEL_EXPORTER_OTLP_TIMEOUT="10")
    env.update(extra_env)
    command = [str(BIN / "tracetrain"), "rollout", "--tasks", str(tasks_file), "--collector",
               f"http://127.0.0.1:{collector.grpc_port}", "--out", str(out_file), "--quiet", *flags]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode in (0, 1), out.stderr
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    return json.loads(out.stdout.strip().splitlines()[-1]), rows


def episodes(data_dir: Path, run_id: str) -> dict[str, dict]:
    table = query(data_dir, "SELECT * FROM episodes WHERE episode_id LIKE $1", [run_id + "-%"])
    return {row["episode_id"]: row for row in table.to_pylist()}


def assert_calc_episodes(data_dir: Path, run_id: str, group_size: int, n_llm_calls: int = 2) -> dict[str, dict]:
    stored = episodes(data_dir, run_id)
    for task in CALC:
        for k in range(group_size):
            row = stored[f"{run_id}-{task['id']}-{k}"]
            assert (row["task_id"], row["rollout_id"], row["reward"], row["has_error"]) == (task["id"], str(k), 1.0,
                                                                                          False)
            assert row["n_llm_calls"] == n_llm_calls
    return stored


def test_callable_agent_episodes_rewards_and_failures(tmp_path, collector, data_dir, fake_server):
    tasks = [*CALC, {"id": "bug", "behave": "raise"}, {"id": "stuck", "behave": "hang"},
             {"id": "own", "behave": "selfreward", "prompt": "What is 1+1?", "answer": "2"}]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent", f"{AGENT}:solve", "--grader", GRADER,
                            "-G", "2", "-C", "8", "--timeout-s", "3", "--run-id", "cal", "--agent-name", "calc")
    assert (summary["episodes"], summary["ok"], summary["failed"], summary["timed_out"]) == (14, 10, 2, 2)
    assert summary["rewarded"] == 10 and summary["mean_reward"] == pytest.approx((8 * 1.0 + 2 * 0.5) / 10)
    by_id = {r["episode_id"]: r for r in rows}
    assert by_id["cal-bug-0"]["error"] == "RuntimeError: agent bug" and by_id["cal-stuck-1"]["status"] == "timeout"
    assert by_id["cal-own-0"]["reward_source"] == "self" and by_id["cal-calc-2-3-0"]["answer"] == "The answer is 6."
    stored = assert_calc_episodes(data_dir, "cal", 2)
    for k in "01":
        assert stored[f"cal-bug-{k}"]["has_error"] and stored[f"cal-stuck-{k}"]["has_error"]
        assert stored[f"cal-bug-{k}"]["reward"] is None
        own = stored[f"cal-own-{k}"]
        assert (own["reward"], own["n_rewards"], own["has_error"]) == (0.5, 1, False)  # not graded on top
    calls = query(data_dir, "SELECT episode_id, agent_name, response_token_ids FROM llm_calls "
                            "WHERE episode_id = 'cal-calc-2-3-1'").to_pylist()
    assert len(calls) == 2 and all(c["response_token_ids"] and c["agent_name"] == "calc" for c in calls)


@pytest.mark.slow
@pytest.mark.parametrize("function", ["solve", "solve_async"])
def test_callable_calls_really_run_concurrently(tmp_path, collector, data_dir, fake_server, function):
    tasks = [{"id": f"s{i}", "behave": "slow"} for i in range(6)] + [CALC[0]]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent", f"{AGENT}:{function}", "-C", "6",
                            "--run-id", function, "--grader", GRADER)
    assert summary["ok"] == 7
    peaks = [int(r["answer"].split()[1]) for r in rows if r["task_id"].startswith("s")]
    assert max(peaks) == 6  # six calls were inside the agent at the same moment
    stored = episodes(data_dir, function)
    assert stored[f"{function}-calc-2-3-0"]["reward"] == 1.0 and stored[f"{function}-calc-2-3-0"]["n_llm_calls"] == 2


def test_agent_server_protocol(tmp_path, collector, data_dir, fake_server):
    tasks = [*CALC, {"id": "bug", "behave": "raise"}, {"id": "stuck", "behave": "hang"}]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent-server",
                            f"{sys.executable} {AGENT} --server", "--server-processes", "2", "--grader", GRADER,
                            "-G", "2", "-C", "8", "--timeout-s", "3", "--run-id", "srv")
    assert (summary["ok"], summary["failed"], summary["timed_out"], summary["mean_reward"]) == (8, 2, 2, 1.0)
    assert {r["error"] for r in rows if r["status"] == "failed"} == {"RuntimeError: agent bug"}
    stored = assert_calc_episodes(data_dir, "srv", 2)
    assert stored["srv-bug-0"]["has_error"] and stored["srv-stuck-1"]["has_error"]


@pytest.mark.slow
def test_command_agent_per_episode(tmp_path, collector, data_dir, fake_server):
    tasks = [*CALC[:2], {"id": "boom", "behave": "crash"}, {"id": "stuck", "behave": "hang"}]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent", f"{sys.executable} {AGENT}",
                            "--grader", GRADER, "-C", "4", "--timeout-s", "20", "--run-id", "cmd",
                            "--failure-reward", "0")
    assert (summary["ok"], summary["failed"], summary["timed_out"]) == (2, 1, 1)
    by_task = {r["task_id"]: r for r in rows}
    assert by_task["boom"]["error"].startswith("exit code 3") and by_task["boom"]["reward"] == 0.0
    assert by_task["calc-2-3"]["answer"] == "The answer is 6."
    stored = episodes(data_dir, "cmd")
    for task in CALC[:2]:
        row = stored[f"cmd-{task['id']}-0"]
        assert (row["task_id"], row["rollout_id"], row["reward"], row["n_llm_calls"], row["has_error"]) == (
            task["id"], "0", 1.0, 2, False)
    assert stored["cmd-boom-0"]["has_error"] and stored["cmd-boom-0"]["reward"] == 0.0


def test_command_grader_and_placeholders(tmp_path, collector, data_dir, fake_server):
    """A shell command agent (no Python start-up, no spans of its own): the task in a placeholder, a command
    grader; the episodes exist through the runner's own spans."""
    grader = (f"{sys.executable} -c \"import json,os; t=json.loads(os.environ['TRACETRAIN_TASK']); "
              f"a=json.loads(os.environ['TRACETRAIN_ANSWER']); print(1.0 if a == t['prompt'].upper() else 0.25)\"")
    tasks = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "bye"}]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent",
                            "sh -c 'echo noise; echo {prompt} | tr a-z A-Z'", "--grader", grader, "-G", "2",
                            "--run-id", "sh", "--protocol", "http/protobuf",  # the runner's spans over OTLP/HTTP
                            "--collector", f"http://127.0.0.1:{collector.http_port}")
    assert summary["ok"] == 4 and {r["reward"] for r in rows} == {1.0}
    stored = episodes(data_dir, "sh")
    assert {(r["task_id"], r["rollout_id"], r["reward"]) for r in stored.values()} == {
        ("a", "0", 1.0), ("a", "1", 1.0), ("b", "0", 1.0), ("b", "1", 1.0)}


@pytest.mark.slow
def test_agent_server_crash_is_one_failed_episode_and_a_restart(tmp_path, collector, data_dir, fake_server):
    """A crashed server is restarted; so is one whose every slot (here 1) timed out."""
    tasks = [CALC[0], {"id": "boom", "behave": "crash"}, {"id": "stuck", "behave": "hang"}, CALC[1]]
    summary, rows = rollout(tmp_path, collector, fake_server, tasks, "--agent-server",
                            f"{sys.executable} {AGENT} --server", "-C", "1", "--grader", GRADER, "--run-id", "crash",
                            "--timeout-s", "6")
    assert (summary["ok"], summary["failed"], summary["timed_out"]) == (2, 1, 1)
    assert [r["status"] for r in rows] == ["ok", "failed", "timeout", "ok"]  # one at a time, in task order
    assert rows[1]["error"].startswith("agent server exited with code 3")
    stored = episodes(data_dir, "crash")
    assert stored["crash-boom-0"]["has_error"] and stored["crash-calc-4-5-0"]["reward"] == 1.0


def test_python_api_with_a_command_agent_and_a_lambda_grader(collector, data_dir):
    """run_rollouts from Python (a command agent keeps OpenTelemetry out of the test process)."""
    seen = []
    tasks = [{"id": "a", "prompt": "yes"}, {"id": 7, "prompt": "no"}]
    summary = run_rollouts(tasks, CommandAgent(["sh", "-c", "echo {prompt}"]), group_size=3, concurrency=4,
                           collector=f"http://127.0.0.1:{collector.grpc_port}", run_id="api",
                           grader=lambda task, answer: float(answer == "yes"), on_result=seen.append)
    assert (summary.n_episodes, summary.n_ok, summary.n_rewarded, summary.mean_reward) == (6, 6, 6, 0.5)
    assert sorted(r.episode_id for r in seen) == sorted(f"api-{t}-{k}" for t in ("a", "7") for k in range(3))
    stored = episodes(data_dir, "api")
    assert {(r["task_id"], r["reward"]) for r in stored.values()} == {("a", 1.0), ("7", 0.0)}
    with pytest.raises(RolloutError, match="no \"id\""):
        run_rollouts([{"prompt": "x"}], "true")


NODE_DIR = ROOT / "examples" / "node_agent"


@pytest.mark.node
@pytest.mark.skipif(os.environ.get("CI") != "true" and not (NODE_DIR / "node_modules" / "@opentelemetry").is_dir(),
                    reason="run `make node-deps` first (CI always runs this test)")
def test_node_agent_server_through_the_proxy(tmp_path, collector, data_dir, upstream, proxy):  # noqa: F811
    """Any language: the Node.js agent server, its LLM calls captured by `tracetrain proxy`."""
    tasks = [{"id": f"mul-{a}-{b}", "prompt": f"What is {a} * {b}?", "answer": str(a * b)} for a, b in ((6, 7), (3, 4))]
    summary, rows = rollout(tmp_path, collector, None, tasks, "--agent-server", f"node {NODE_DIR / 'rollout_server.js'}",
                            "-G", "2", "-C", "4", "--grader", GRADER, "--run-id", "node",
                            TRACETRAIN_PROXY_URL=proxy.url + "/v1", OTEL_NODE_RESOURCE_DETECTORS="env,host,os,process",
                            OTEL_EXPORTER_OTLP_TIMEOUT="10000")  # milliseconds in JS (seconds in Python's SDK)
    assert (summary["ok"], summary["mean_reward"]) == (4, 1.0), rows
    calls = _calls(proxy, data_dir, "episode_id LIKE 'node-%'")
    assert len(calls) == 8, calls
    assert all(c["response_token_ids"] and c["agent_name"] == "node-agent" for c in calls)
    assert {(c["episode_id"], c["task_id"], c["rollout_id"]) for c in calls} == {
        (f"node-{t['id']}-{k}", t["id"], str(k)) for t in tasks for k in range(2)}
    stored = episodes(data_dir, "node")
    assert all(row["reward"] == 1.0 and row["n_llm_calls"] == 2 and not row["has_error"] for row in stored.values())
    assert all(len(row["trace_ids"]) == 1 for row in stored.values())  # the agent continued the runner's trace


def test_result_line_parsing():
    assert parse_result_line("log\nThe answer is 6.\n\n") == ("The answer is 6.", None)
    assert parse_result_line('x\n{"answer": 6, "reward": 1}\n') == (6, 1.0)
    assert parse_result_line('{"answer": "a", "reward": "high"}') == ("a", None)
    assert parse_result_line("") == ("", None)


@pytest.mark.parametrize("tasks, flags, message", [
    ('{"prompt": "x"}\n', ["--agent", "true"], "no \"id\""),
    ('{"id": 1}\n{"id": 1}\n', ["--agent", "true"], "appears twice"),
    ('{"id": 1}\nnot json\n', ["--agent", "true"], ":2: not JSON"),
    ('{"id": 1}\n', [], "exactly one of --agent"),
    ('{"id": 1}\n', ["--agent", "no-such-agent-binary --x"], "agent command not found"),
    ('{"id": 1}\n', ["--agent", "no_such_module_xyz:solve"], "cannot load"),
    ('{"id": 1}\n', ["--agent", "true", "--grader", "no_such_module_xyz:grade"], "cannot load"),
])
def test_bad_input_is_a_usage_error(tmp_path, tasks, flags, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text(tasks)
    result = CliRunner().invoke(rollout_command, ["--tasks", str(path), "--quiet", *flags])
    assert result.exit_code == 2 and message in result.output, result.output
