"""examples/why_rl.py, short form: both arms (SFT on few demos, GRPO through vLLM) train and are scored."""

from __future__ import annotations

import json

import pytest

from tests.integration.vllm_fixtures import run_quick_example


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_why_rl_trains_and_scores_both_arms(tmp_path):
    work = tmp_path / "why-rl"
    done = run_quick_example("why_rl.py", work, timeout_s=1100)
    result = json.loads((work / "why_rl.json").read_text())
    assert result["demos"] == 80 and result["heldout"] == 32
    # SFT arm: a scored model folder every 10 of its 20 steps
    assert [p["step"] for p in result["sft"]] == [10, 20]
    # GRPO arm: the trainer's checkpoints (every 2 steps, and at exit), scored the same way
    grpo_steps = [p["step"] for p in result["grpo"]]
    assert grpo_steps == sorted(set(grpo_steps)) and grpo_steps[0] == 2 and grpo_steps[-1] >= 3
    for point in [result["start"], *result["sft"], *result["grpo"]]:
        assert 0.0 <= point["success"] <= 1.0 and set(point["by_kind"]) >= {"all"}
    # the GRPO arm's own evaluations went through vLLM and were answered by the pushed weights
    evals = result["grpo_vllm_evals"]
    assert evals[0]["policy_version_max"] == 0 and evals[-1]["policy_version_min"] >= 1
    assert (work / "why_rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SFT best" in done.stdout
