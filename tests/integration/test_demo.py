"""`make demo`, short form: the loop closes through the real collector, vLLM, rollout and trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tracetrain.collector import reader

from tests.integration.vllm_fixtures import run_quick_example


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_demo_closes_the_loop(tmp_path):
    work = tmp_path / "demo"
    done = run_quick_example("demo.py", work, timeout_s=1100)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["loop_closed"] is True
    assert summary["spans_ingested"] > 0
    assert summary["train_llm_calls"] == summary["train_llm_calls_with_token_ids"] > 0
    assert summary["policy_version_after"] > summary["policy_version_before"] == 0
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out success" in done.stdout

    steps = reader.query(work / "data", "SELECT step, n_transitions, policy_version FROM train_steps "
                                         "ORDER BY step").to_pylist()
    trained = [s for s in steps if s["policy_version"] is not None]  # a round with no signal pushes nothing
    assert trained and all(s["n_transitions"] > 0 for s in trained)
    pushed = [s["policy_version"] for s in trained]
    assert pushed == sorted(pushed) and pushed[-1] >= 1
    # spans sampled after a push carry the newer version: the served weights changed under the agent
    by_round = reader.query(work / "data", """
        SELECT regexp_extract(episode_id, '-r([0-9]+)-', 1)::INT AS round, max(policy_version) AS version
        FROM llm_calls WHERE episode_id LIKE 'train-%' GROUP BY 1 ORDER BY 1""").to_pylist()
    assert by_round[0]["version"] == 0 and by_round[-1]["version"] > by_round[0]["version"]
    # the evaluation after training was answered by the last pushed version
    final = summary["evals"][-1]
    assert final["policy_version_min"] == final["policy_version_max"] == pushed[-1]
