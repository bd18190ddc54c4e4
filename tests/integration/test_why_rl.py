"""examples/why_rl.py, short form: both arms (SFT on few demos, GRPO through vLLM) train and are scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_why_rl_trains_and_scores_both_arms(tmp_path):
    if not SERVE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-serve is missing in CI (make serve-env)")
        pytest.skip("no .venv-serve (make serve-env)")
    work = tmp_path / "why-rl"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "why_rl.py"), "--quick", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((work / "why_rl.json").read_text())
    assert result["demos"] == 128 and result["heldout"] == 32
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
