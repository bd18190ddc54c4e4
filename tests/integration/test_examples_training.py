"""The training examples' --quick forms: SFT from the best stored episodes, offline GRPO from
spans of two policy versions (importance correction), APO with a scripted critic.

The store is built once: a tiny model warmed up for 40 steps (policy version 0, the starting
model) and a copy with slightly perturbed weights (another policy, standing in for a later
version 1) each sample 8 tasks x 8 episodes in process (HF generate, T=1, behaviour logprobs),
exported as OTLP spans to a real collector. The examples then really train the tiny model
(`tracetrain train` subprocesses).
"""

from __future__ import annotations

import copy
import math
import re
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tracetrain.trainer import model_init, store, warmup

from tests.conftest import make_collector
from tests.integration.fake_chat import FakeChat
from tests.integration.rl_episodes import export_episodes, sample_episodes

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module")
def two_version_store(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("examples")
    base = model_init.init_model(root / "tiny", size="tiny", seed=0)
    report = warmup.warmup(base, "calc", steps=40, seed=0)  # varied rewards in every group of both versions
    warm = warmup.save_warmed(report, base, root / "warm")
    tok = AutoTokenizer.from_pretrained(str(warm), local_files_only=True)
    other = copy.deepcopy(report.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
    data = root / "data"
    collector = make_collector(data)
    try:
        t0 = time.time_ns()
        for version, model in enumerate((report.model, other)):
            episodes = sample_episodes(model, tok, "calc", n_tasks=8, group_size=8, seed=10 + version,
                                       prefix="train")
            export_episodes(collector.grpc_port, episodes, t0, policy_version=version, first_index=64 * version)
    finally:
        collector.stop()
    return warm, data


@pytest.mark.timeout(900)  # the module fixture (warm-up, sampling) runs in the first test
def test_sft_from_best_raises_the_best_responses_likelihood(two_version_store, tmp_path):
    import sft_from_best

    warm, data = two_version_store
    out = sft_from_best.main(["--quick", "--data", str(data), "--model", str(warm), "--where", "reward >= 0.5", "--lr", "1e-3",
                              "--workdir", str(tmp_path)])
    print(out)
    assert 0 < out["episodes_selected"] < out["episodes_in_store"] == 128
    # imitation took effect: the selected responses got clearly likelier per token
    assert out["selected_response_logprob_after"] > out["selected_response_logprob_before"] + 0.03
    for key in ("success_before", "success_after"):
        assert set(out[key]) >= {"all", "add", "sub", "price"} and 0 <= out[key]["all"] <= 1
    con = store.connect(data)
    try:
        steps = con.execute("SELECT algo, count(*), min(loss) FROM train_steps WHERE run_id = ? GROUP BY algo",
                            [out["run_id"]]).fetchall()
    finally:
        con.close()
    # --quick: at most 8 steps of 32 episodes over at most 4 passes (the last batch may be short)
    assert steps[0][:2] == ("sft", min(8, math.ceil(4 * out["episodes_selected"] / 32))) and steps[0][2] > 0


def test_offline_grpo_from_two_policy_versions_is_importance_corrected(two_version_store, tmp_path):
    import offline_vs_online

    warm, data = two_version_store
    out = offline_vs_online.main(["--quick", "--data", str(data), "--model", str(warm), "--out", str(tmp_path),
                                  "--group-size", "8"])
    print(out)
    offline = out["offline"]
    assert offline["steps"] == 2 and offline["behaviour_versions"] == [0, 1] and out["online"] is None
    assert offline["clip_fraction_mean"] is not None
    start = {band["versions"]: band for band in out["ratio_by_version_at_start"]}
    end = {band["versions"]: band for band in offline["ratio_by_version_at_end"]}
    # the starting model sampled version 0: its ratios are 1; version 1 was another policy
    assert abs(start["0..0"]["ratio_mean"] - 1) < 0.01 and start["0..0"]["outside_clip"] < 0.01
    assert start["1..1"]["outside_clip"] > start["0..0"]["outside_clip"] + 0.05
    # training moved the policy away from the version-0 sampler
    assert end["0..0"]["outside_clip"] > start["0..0"]["outside_clip"]
    assert Path(offline["checkpoint"], "model.safetensors").exists()


def _critic(request: dict) -> str:
    """Scripted critic: a critique, then edits that depend on the prompt under critique."""
    current = re.search(r"<current>\n(.*?)\n</current>", request["messages"][1]["content"], re.DOTALL).group(1)
    if len(request["messages"]) == 2:
        return "The agent estimates instead of calculating, and wraps the number in a sentence."
    if "calculator" not in current:
        return f"<prompt>{current} Use the calculator tool for every sum.</prompt>\n<prompt>{current} Be concise.</prompt>"
    return f"<prompt>{current} Reply with only the number.</prompt>\n<prompt>{current} Be kind.</prompt>"


def test_apo_example_improves_the_prompt_with_a_scripted_critic(tmp_path):
    import apo_example

    with FakeChat(_critic) as critic:
        out = apo_example.main(["--quick", "--critic-url", critic.url, "--workdir", str(tmp_path)])
    print(out)
    assert out["baseline_score"] < 0.5 and out["best_score"] == 1.0
    assert out["prompt"].endswith("Use the calculator tool for every sum. Reply with only the number.")
    assert [r["best_score"] for r in out["rounds"]] == sorted(r["best_score"] for r in out["rounds"])
    assert [r["prompt_version"] for r in out["rounds"]] == [1, 2, 3]
    assert [v["version"] for v in out["published"]] == [1, 2, 3]
    assert [v["score"] for v in out["published"]][1:] == [0.5, 1.0]
    assert any(r["messages"][1]["content"].count("The answer is") for r in critic.requests)  # it saw the failures
