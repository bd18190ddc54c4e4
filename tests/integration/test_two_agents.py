"""examples/two_agent_system.py and `make demo-two-agents`: one agent of two trained, the other untouched.

* fast: the system under the real `tracetrain rollout` against a scripted OpenAI server and a real
  collector; each LLM call lands under its own agent's name, and `--agent caller` leaves the
  answerer's calls out as ``agent_not_selected``;
* slow: examples/two_agents.py --quick (real vLLM, real offline GRPO runs): the untouched agent's
  weights are byte-identical, the trained adapter changed, two agents train two adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tracetrain.collector import reader
from tracetrain.trainer import store
from tracetrain.trainer import transitions as tr

from tests.integration.test_tool_agent import server, tool_agent  # noqa: F401 - fixture: scripted OpenAI server
from tests.integration.vllm_fixtures import run_quick_example

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SYSTEM = f"{ROOT / 'examples' / 'two_agent_system.py'}:solve"
GRADER = f"{ROOT / 'examples' / 'demo_tasks.py'}:grade"


def test_each_agents_calls_are_stored_under_its_name(tmp_path, collector, data_dir, server):  # noqa: F811
    tasks = [{"id": "add", "question": "What is 37+12?", "answer": "49"},
             {"id": "item", "question": "How much does item 412 cost?", "answer": str(tool_agent.price_of(412))}]
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACETRAIN_", "TOOL_AGENT_", "TWO_"))}
    env.update(OPENAI_BASE_URL=server["base_url"], OPENAI_API_KEY="EMPTY", TWO_AGENTS_CALLER_MODEL="policy-caller")
    out = subprocess.run([str(BIN / "tracetrain"), "rollout", "--tasks", str(tasks_file), "--agent", SYSTEM,
                          "--grader", GRADER, "-G", "2", "-C", "4", "--run-id", "two", "--agent-name", "two_agent_system",
                          "--collector", f"http://127.0.0.1:{collector.grpc_port}", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["episodes"], summary["ok"], summary["mean_reward"]) == (4, 4, 1.0)
    # each agent called its own served model: caller's variable, answerer on the default
    models = [(len(r["messages"]), r["model"]) for r in server["requests"]]
    assert sorted(models) == [(1, "policy-caller")] * 4 + [(3, "policy-base")] * 4

    calls = reader.query(data_dir, "SELECT episode_id, agent_name FROM llm_calls WHERE episode_id LIKE 'two-%' "
                                   "ORDER BY episode_id, start_time_unix_nano").to_pylist()
    by_episode: dict[str, list[str]] = {}
    for call in calls:
        by_episode.setdefault(call["episode_id"], []).append(call["agent_name"])
    assert by_episode == {f"two-{t}-{k}": ["caller", "answerer"] for t in ("add", "item") for k in "01"}

    con = store.connect(data_dir)  # what `tracetrain train --agent caller` builds from these episodes
    try:
        loaded = tr.load_calls(con, where="episode_id LIKE 'two-%'")
    finally:
        con.close()
    _, skipped = tr.build_transitions(loaded, tr.TransitionConfig(agents=("caller",)))
    assert skipped["agent_not_selected"] == 4  # the answerer's four calls (the scripted server sends no token ids)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_two_agents_trains_only_the_selected_agent(tmp_path):
    work = tmp_path / "two"
    run_quick_example("two_agents.py", work, timeout_s=850)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["ok"] is True, summary["checks"]

    # both agents' calls were captured, each under its own name, with token ids and logprobs
    by_agent = summary["llm_calls_by_agent"]
    assert set(by_agent) == {"caller", "answerer"}
    for counts in by_agent.values():
        assert counts["calls"] == counts["with_ids"] == counts["with_logprobs"] > 0
    assert by_agent["caller"]["calls"] == summary["sampled"]["episodes"]  # one caller call per episode

    # --agent caller: the base weights (the answerer's) are byte-identical, caller's adapter moved
    base = summary["base_weights_sha256"]
    assert base["before"] == base["after"]
    one = summary["runs"]["caller-only"]
    assert one["checkpoint_adapters"] == ["default"]
    caller = one["adapters"]["caller"]
    assert caller["sha256_trained"] != caller["sha256_initial"] and caller["tensors_changed"] > 0
    assert summary["caller_only_skipped"]["agent_not_selected"] == by_agent["answerer"]["calls"]
    assert {s["agent_name"] for s in one["train_steps"]} == {None}  # one policy: the row names no agent

    # --agent caller --agent answerer: two adapters trained as separate policies, a row per agent and step
    both = summary["runs"]["both"]
    assert both["checkpoint_adapters"] == ["agent_answerer", "agent_caller"]
    for agent in ("caller", "answerer"):
        info = both["adapters"][agent]
        assert info["sha256_trained"] != info["sha256_initial"] and info["tensors_changed"] > 0
    steps = reader.query(work / "data", "SELECT step, agent_name, n_tokens FROM train_steps "
                                         "WHERE run_id = 'both' ORDER BY step, agent_name").to_pylist()
    assert steps and {s["agent_name"] for s in steps} == {"caller", "answerer"}
    for step in {s["step"] for s in steps if s["n_tokens"] > 0}:  # a step that updated anything updated both
        assert sorted((s["agent_name"], s["n_tokens"] > 0) for s in steps if s["step"] == step) == \
            [("answerer", True), ("caller", True)]
    assert "agent_not_selected" not in json.dumps(both["train_steps"])
    # training the answerer's adapter alongside left caller's byte-identical to the caller-only run
    assert both["adapters"]["caller"]["sha256_trained"] == caller["sha256_trained"]
    lineage = reader.query(work / "data", "SELECT run_id, agent_name FROM checkpoints ORDER BY 1, 2").to_pylist()
    assert {(r["run_id"], r["agent_name"]) for r in lineage} >= {("both", "caller"), ("both", "answerer")}
