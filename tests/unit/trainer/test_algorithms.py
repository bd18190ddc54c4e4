"""The loss registry: one signature, PPO-clip maths against a per-token reference, SFT, k3 KL."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from tracetrain.trainer import algorithms as al
from tracetrain.trainer.batch import Batch


def make_batch(old, adv, mask, ref=None) -> Batch:
    old, adv, mask = (torch.tensor(x, dtype=torch.float32) for x in (old, adv, mask))
    b, t = old.shape
    batch = Batch(input_ids=torch.zeros(b, t, dtype=torch.long), attention_mask=torch.ones(b, t, dtype=torch.long),
                  response_mask=mask, old_logprobs=old, advantages=adv * mask,
                  policy_versions=torch.zeros(b, dtype=torch.long), episode_ids=[f"e{i}" for i in range(b)],
                  rows=pa.table({"episode_id": [f"e{i}" for i in range(b)]}))
    if ref is not None:
        batch.ref_logprobs = torch.tensor(ref, dtype=torch.float32)
    return batch


def reference_ppo(new, batch, cfg):
    """Per-token loop version of the PPO-clip loss (the vectorized one must equal it)."""
    total, n = 0.0, 0
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if batch.response_mask[b, t] == 0:
                continue
            old = float(batch.old_logprobs[b, t])
            if math.isnan(old):
                old = float(new[b, t])
            r = math.exp(float(new[b, t]) - old)
            a = float(batch.advantages[b, t])
            hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
            loss = max(-a * r, -a * min(max(r, 1 - cfg.clip_eps), 1 + hi))
            if cfg.dual_clip_c is not None and a < 0:
                loss = min(loss, -a * cfg.dual_clip_c)
            total += loss
            n += 1
    return total / n


def test_registry_has_one_signature_and_rejects_duplicates():
    assert {"grpo", "ppo", "sft"} <= set(al.ALGORITHMS)
    assert al.get_algorithm("grpo").advantage == "grpo" and al.get_algorithm("ppo").advantage == "baseline"
    assert al.get_algorithm("sft").needs_reward is False
    with pytest.raises(ValueError, match="already registered"):
        al.register("grpo", advantage="grpo", needs_reward=True)(al.grpo_loss)
    with pytest.raises(KeyError, match="choose one of grpo, ppo, sft"):
        al.get_algorithm("dpo")
    batch = make_batch([[0.0, -1.0, -2.0]], [[0.0, 1.0, 1.0]], [[0, 1, 1]])
    new = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    for algo in al.ALGORITHMS.values():  # every entry takes the same arguments and gives the same metrics
        out = algo.loss(new, batch, al.AlgoConfig())
        assert out.loss.ndim == 0 and {"clip_fraction", "kl", "entropy"} <= set(out.metrics)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_equals_per_token_reference(seed, dual):
    g = torch.Generator().manual_seed(seed)
    new = (-torch.rand(4, 7, generator=g) * 3).requires_grad_(True)
    old = new.detach() + torch.randn(4, 7, generator=g) * 0.6
    old[1, 3] = float("nan")  # a retokenized token: ratio 1
    adv = torch.randn(4, 1, generator=g).expand(4, 7).clone()
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    mask[:, 0] = 0
    cfg = al.AlgoConfig(clip_eps=0.2, dual_clip_c=dual)
    batch = make_batch(old.tolist(), adv.tolist(), mask.tolist())
    out = al.ppo_clip_loss(new, batch, cfg)
    assert out.loss.item() == pytest.approx(reference_ppo(new.detach(), batch, cfg), abs=1e-5)


def test_ratio_one_gives_policy_gradient_token_mean():
    # two rows of different lengths: every response token weighs 1 / (all tokens), not 1 / row length
    old = [[0.0, -1.0, -1.0, -1.0], [0.0, -2.0, 0.0, 0.0]]
    batch = make_batch(old, [[0, 1.0, 1.0, 1.0], [0, -2.0, 0, 0]], [[0, 1, 1, 1], [0, 1, 0, 0]])
    new = torch.tensor(old, requires_grad=True)
    out = al.grpo_loss(new, batch, al.AlgoConfig())
    assert out.loss.item() == pytest.approx(-(1 + 1 + 1 - 2) / 4)
    out.loss.backward()
    assert torch.allclose(new.grad, torch.tensor([[0, -0.25, -0.25, -0.25], [0, 0.5, 0, 0]]))
    assert out.metrics["clip_fraction"] == 0 and out.metrics["ratio_mean"] == pytest.approx(1.0)
    assert out.metrics["entropy"] == pytest.approx((1 + 1 + 1 + 2) / 4)
    assert math.isnan(out.metrics["kl"])


def test_clipped_tokens_get_no_gradient_and_are_counted():
    # A > 0 with ratio e^0.5 > 1.2, and A < 0 with ratio e^-0.5 < 0.8: both clipped
    batch = make_batch([[0.0, -1.0, -1.0]], [[0, 1.0, -1.0]], [[0, 1, 1]])
    new = torch.tensor([[0.0, -0.5, -1.5]], requires_grad=True)
    out = al.ppo_clip_loss(new, batch, al.AlgoConfig(clip_eps=0.2))
    out.loss.backward()
    assert out.metrics["clip_fraction"] == 1.0
    assert torch.count_nonzero(new.grad) == 0
    assert out.loss.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_dual_clip_caps_negative_advantage_tokens():
    batch = make_batch([[0.0, -5.0]], [[0, -1.0]], [[0, 1]])
    new = torch.tensor([[0.0, -1.0]], requires_grad=True)  # ratio e^4 ~ 55
    capped = al.ppo_clip_loss(new, batch, al.AlgoConfig(dual_clip_c=3.0))
    free = al.ppo_clip_loss(new, batch, al.AlgoConfig(dual_clip_c=None))
    assert capped.loss.item() == pytest.approx(3.0)
    assert free.loss.item() == pytest.approx(math.exp(4), rel=1e-4)
    assert capped.metrics["dual_clip_fraction"] == 1.0


def test_k3_kl_to_reference():
    old = [[0.0, -1.0, -2.0]]
    new = torch.tensor(old, requires_grad=True)
    same = make_batch(old, [[0, 0, 0]], [[0, 1, 1]], ref=old)
    assert al.grpo_loss(new, same, al.AlgoConfig(kl_beta=0.1)).metrics["kl"] == pytest.approx(0.0)
    ref = [[0.0, -1.5, -1.0]]
    other = make_batch(old, [[0, 0, 0]], [[0, 1, 1]], ref=ref)
    k3 = [math.exp(r - n) - (r - n) - 1 for r, n in ((-1.5, -1.0), (-1.0, -2.0))]
    out = al.grpo_loss(new, other, al.AlgoConfig(kl_beta=0.5))
    assert out.metrics["kl"] == pytest.approx(sum(k3) / 2, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.5 * sum(k3) / 2, rel=1e-5)  # advantages 0: only the KL term
    assert math.isnan(al.grpo_loss(new, other, al.AlgoConfig(kl_beta=0.0)).metrics["kl"])


def test_sft_is_masked_token_mean_nll():
    batch = make_batch([[0.0] * 4], [[0] * 4], [[0, 1, 1, 0]])
    new = torch.tensor([[-9.0, -1.0, -3.0, -9.0]], requires_grad=True)
    out = al.sft_loss(new, batch, al.AlgoConfig())
    assert out.loss.item() == pytest.approx(2.0)
    out.loss.backward()
    assert new.grad.tolist() == [[0.0, -0.5, -0.5, 0.0]]


def test_config_validation():
    for bad in (dict(clip_eps=0), dict(clip_eps=1.5), dict(dual_clip_c=0.5), dict(kl_beta=-1)):
        with pytest.raises(ValueError):
            al.AlgoConfig(**bad)
