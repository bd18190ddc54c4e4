"""The must-learn test: GRPO from stored spans raises the probability of rewarded behaviour.

A warmed-up tiny model samples tool-task episodes in process (HF generate, T=1, behaviour
logprobs recorded); they go to a real collector as OTLP spans (token ids, logprobs, policy
version, episode/task ids, the verifier's reward). ``train()`` then runs GRPO over the store
for a few steps, full fine-tuning and LoRA, and the mean per-token logprob of the episodes
with a positive advantage must rise clearly more than under a no-update control (lr 0),
while that of negative-advantage episodes rises less (or falls).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.conftest import make_collector
from tests.integration.rl_episodes import export_episodes, sample_episodes
from tracetrain.trainer import advantages, model_init, store, transitions, warmup
from tracetrain.trainer.batch import to_batch
from tracetrain.trainer.policy import LoraSpec, latest_checkpoint, load_checkpoint, load_policy, token_logprobs
from tracetrain.trainer.train_config import TrainConfig
from tracetrain.trainer.train_loop import train

pytestmark = pytest.mark.slow
STEPS = 4
MARGIN_NATS = 0.5  # per response: rewarded responses at least e^0.5 = 1.65x likelier than under the control


@pytest.fixture(scope="module")
def rl_store(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("rl")
    base = model_init.init_model(root / "tiny", size="tiny", seed=0)
    report = warmup.warmup(base, "calc", steps=30, seed=0)
    warm = warmup.save_warmed(report, base, root / "warm")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(warm), local_files_only=True)
    episodes = sample_episodes(report.model, tok, "calc", n_tasks=8, group_size=8, seed=1)
    data = root / "data"
    collector = make_collector(data)
    try:
        export_episodes(collector.grpc_port, episodes, time.time_ns(), policy_version=0)
    finally:
        collector.stop()
    con = store.connect(data)
    rows, _ = transitions.build_transitions(transitions.load_calls(con))
    con.close()
    rows, _ = advantages.grpo(rows)
    return warm, data, rows


def _row_logprob(policy, rows) -> np.ndarray:
    """Log-probability of each row's sampled response (sum over its response tokens): [rows]."""
    batch = to_batch(rows, policy.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(policy.activate(None), batch)
    return (lp * batch.response_mask).sum(1).numpy()


def _shift(warm, rows, out_dir, lora: LoraSpec | None) -> tuple[float, float]:
    """(mean change of positive-advantage rows, of negative-advantage rows) after training."""
    before = _row_logprob(load_policy(warm, lora=lora), rows)
    policy = load_policy(warm, lora=lora)
    load_checkpoint(policy, {}, latest_checkpoint(out_dir))
    after = _row_logprob(policy, rows)
    adv = rows["advantage"].to_numpy()
    delta = after - before
    return float(delta[adv > 0].mean()), float(delta[adv < 0].mean())


def _train(warm, data, tmp_path, name, **kw):
    cfg = TrainConfig(data_dir=str(data), model_dir=str(warm), algo="grpo", group_size=8, batch_episodes=64,
                      data_epochs=STEPS, minibatches=2, run_id=name, out_dir=str(tmp_path / name), threads=2,
                      seed=0, **kw)
    report = train(cfg, progress=False)
    assert report.stop_reason == "data_exhausted" and report.steps_done == STEPS
    return report


def test_grpo_full_fine_tuning_learns_vs_control(rl_store, tmp_path):
    warm, data, rows = rl_store
    assert 0 < (rows["advantage"].to_numpy() > 0).sum() < rows.num_rows
    _train(warm, data, tmp_path, "full", lr=2e-4)
    _train(warm, data, tmp_path, "control", lr=0.0)
    pos, neg = _shift(warm, rows, tmp_path / "full", None)
    pos0, neg0 = _shift(warm, rows, tmp_path / "control", None)
    print(f"full FT: rewarded {pos:+.3f} unrewarded {neg:+.3f}; control {pos0:+.3f} {neg0:+.3f} nats/response")
    assert abs(pos0) < 1e-6 and abs(neg0) < 1e-6  # lr 0: the loop itself changes nothing
    assert pos - pos0 > MARGIN_NATS
    assert pos - neg > MARGIN_NATS
    con = store.connect(data)
    steps = con.sql("SELECT step, n_episodes, n_tokens, loss, clip_fraction, skipped FROM train_steps "
                    "WHERE run_id = 'full' ORDER BY step").fetchall()
    lineage = con.sql("SELECT step, len(episode_ids), trained_policy_versions FROM checkpoints "
                      "WHERE run_id = 'full' ORDER BY step").fetchall()
    con.close()
    assert [s[0] for s in steps] == list(range(1, STEPS + 1))
    assert all(s[2] > 0 and s[3] is not None for s in steps)
    assert lineage[0][1] == 64 and lineage[0][2] == [0]


def test_grpo_lora_learns_vs_control(rl_store, tmp_path):
    warm, data, rows = rl_store
    _train(warm, data, tmp_path, "lora", lr=2e-3, lora=True)
    pos, neg = _shift(warm, rows, tmp_path / "lora", LoraSpec())
    print(f"LoRA: rewarded {pos:+.3f} unrewarded {neg:+.3f} nats/response")
    assert pos > MARGIN_NATS  # the control changes nothing (previous test)
    assert pos - neg > MARGIN_NATS
