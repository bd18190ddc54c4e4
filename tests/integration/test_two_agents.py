"""`make demo-two-agents`, short form: train one agent of two, the other's weights stay byte-identical.

Real collector, real vLLM (base weights) serving the two-agent system, real offline GRPO runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracetrain.collector import reader

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_two_agents_trains_only_the_selected_agent(tmp_path):
    if not SERVE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-serve is missing in CI (make serve-env)")
        pytest.skip("no .venv-serve (make serve-env)")
    work = tmp_path / "two"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "two_agents.py"), "--quick", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
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
    for step in {s["step"] for s in steps}:
        assert sorted(s["agent_name"] for s in steps if s["step"] == step) == ["answerer", "caller"]
    assert "agent_not_selected" not in json.dumps(both["train_steps"])
    lineage = reader.query(work / "data", "SELECT run_id, agent_name FROM checkpoints ORDER BY 1, 2").to_pylist()
    assert {(r["run_id"], r["agent_name"]) for r in lineage} >= {("both", "caller"), ("both", "answerer")}
