"""Loss functions of the trainer, one registry with one signature.

Every algorithm is ``loss(new_logprobs, batch, cfg) -> LossOutput``:

* ``new_logprobs``: ``[B, T]`` log-probability under the policy being trained of
  ``batch.input_ids[b, t]`` (position convention of ``policy.token_logprobs``: filled
  for t >= 1, 0 at t = 0), with gradient;
* ``batch``: a ``trainer.batch.Batch`` (``response_mask``, ``old_logprobs``, ``advantages``
  are ``[B, T]``);
* ``cfg``: an ``AlgoConfig``.

The loop never branches on the algorithm's name: it asks the registry entry which
advantage estimator to run (``Algorithm.advantage``) and whether episodes need a reward.

Losses are **token-means over the batch's response tokens** (every sampled token weighs
the same, whatever the length of its sequence: Dr. GRPO / DAPO style, no per-sequence
length normalisation).

Reference KL (``cfg.kl_beta > 0``): the loop sets ``batch.ref_logprobs`` (``[B, T]``,
detached, the reference policy's logprobs) before calling the loss; the k3 estimator
``exp(ref - new) - (ref - new) - 1`` (Schulman, "Approximating KL divergence", 2020) is
averaged over response tokens and added with weight ``kl_beta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: the CLI imports this module's names at start-up
    from torch import Tensor


@dataclass(frozen=True)
class AlgoConfig:
    """Knobs of the losses (the loop builds it from ``TrainConfig``)."""

    clip_eps: float = 0.2          # PPO ratio clip: [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # upper clip (None: same as clip_eps; DAPO "clip-higher" if larger)
    dual_clip_c: float | None = 3.0  # dual-clip cap for negative advantages (Ye et al. 2020); None: off
    kl_beta: float = 0.0           # weight of the k3 KL to the reference policy

    def __post_init__(self) -> None:
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ValueError(f"clip_eps_high must be positive, got {self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")


@dataclass
class LossOutput:
    loss: "Tensor"                     # scalar, with gradient
    metrics: dict[str, float] = field(default_factory=dict)  # clip_fraction, kl, ratio_mean, entropy, ...


LossFn = Callable[["Tensor", Any, AlgoConfig], LossOutput]


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantage: str      # advantage estimator run before the loss: "grpo" | "baseline" | "none"
    loss: LossFn
    needs_reward: bool  # episodes without a reward are skipped (reason no_reward)


ALGORITHMS: dict[str, Algorithm] = {}


class UnknownAlgorithm(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str, *, advantage: str, needs_reward: bool) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to ``ALGORITHMS`` under ``name``; a duplicate name raises."""
    def deco(fn: LossFn) -> LossFn:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        ALGORITHMS[name] = Algorithm(name, advantage, fn, needs_reward)
        return fn
    return deco


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UnknownAlgorithm(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}") from None


# ---------------------------------------------------------------- shared pieces

def _masked_mean(x: "Tensor", mask: "Tensor") -> "Tensor":
    """Mean of ``x`` over ``mask == 1`` (both ``[B, T]``); 0 when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def effective_old_logprobs(new_logprobs: "Tensor", batch: Any) -> "Tensor":
    """``batch.old_logprobs`` with unknown entries (NaN: retokenized rows) replaced by the
    current policy's detached logprobs, so those tokens get ratio 1 (on-policy)."""
    import torch
    old = batch.old_logprobs
    return torch.where(torch.isnan(old), new_logprobs.detach(), old)


def _reference_kl(new_logprobs: "Tensor", batch: Any, mask: "Tensor", cfg: AlgoConfig) -> "Tensor | None":
    """k3 KL(new || ref) token-mean, or None when no reference is asked for / given."""
    import torch
    ref = getattr(batch, "ref_logprobs", None)
    if cfg.kl_beta <= 0 or ref is None:
        return None
    diff = (ref - new_logprobs).clamp(-20.0, 20.0)  # exp overflow guard on far-off tokens
    k3 = torch.exp(diff) - diff - 1.0
    return _masked_mean(k3, mask)


def _common_metrics(new_logprobs: "Tensor", mask: "Tensor", n_tokens: float) -> dict[str, float]:
    import torch
    with torch.no_grad():
        return {"entropy": float(_masked_mean(-new_logprobs, mask)), "n_tokens": n_tokens}


# ---------------------------------------------------------------- PPO-clip (grpo, ppo)

def ppo_clip_loss(new_logprobs: "Tensor", batch: Any, cfg: AlgoConfig) -> LossOutput:
    """PPO-clip policy loss against the behaviour logprobs, token-mean over response tokens.

    Per response token (``A`` the advantage, ``r = exp(new - old)`` the importance ratio
    against the behaviour policy that sampled the token, so stale samples are corrected):
    ``l = max(-A r, -A clip(r, 1 - eps, 1 + eps_high))``, and for ``A < 0`` with dual clip
    ``l = min(l, -A c)``, which bounds the weight of a token the current policy finds far
    likelier than the behaviour policy did (a truncated importance weight).

    Shapes: ``new_logprobs``, ``batch.old_logprobs``, ``batch.advantages``,
    ``batch.response_mask``: ``[B, T]``.
    """
    import torch
    mask = batch.response_mask.to(new_logprobs.dtype)
    adv = batch.advantages.to(new_logprobs.dtype)
    old = effective_old_logprobs(new_logprobs, batch)
    log_ratio = (new_logprobs - old).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + hi)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip_c is not None:
        cap = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    loss = _masked_mean(per_token, mask)
    kl = _reference_kl(new_logprobs, batch, mask, cfg)
    if kl is not None:
        loss = loss + cfg.kl_beta * kl
    n_tokens = float(mask.sum())
    with torch.no_grad():
        was_clipped = ((clipped > unclipped) | dual).to(mask.dtype)
        metrics = {
            "loss": float(loss),
            "pg_loss": float(_masked_mean(per_token, mask)),
            "clip_fraction": float(_masked_mean(was_clipped, mask)),
            "dual_clip_fraction": float(_masked_mean(dual.to(mask.dtype), mask)),
            "ratio_mean": float(_masked_mean(ratio, mask)),
            "ratio_max": float((ratio * mask).max()) if n_tokens else math.nan,
            # KL(behaviour || current), k3 estimate: how far the policy moved from the sampler
            "behaviour_kl": float(_masked_mean(torch.exp(-log_ratio) + log_ratio - 1.0, mask)),
            "kl": float(kl) if kl is not None else math.nan,
            **_common_metrics(new_logprobs, mask, n_tokens),
        }
    return LossOutput(loss, metrics)


@register("grpo", advantage="grpo", needs_reward=True)
def grpo_loss(new_logprobs: "Tensor", batch: Any, cfg: AlgoConfig) -> LossOutput:
    """GRPO (Shao et al. 2024): PPO-clip on group-normalised episode advantages, no value net."""
    return ppo_clip_loss(new_logprobs, batch, cfg)


@register("ppo", advantage="baseline", needs_reward=True)
def ppo_loss(new_logprobs: "Tensor", batch: Any, cfg: AlgoConfig) -> LossOutput:
    """PPO-clip on reward minus a per-task mean baseline (no value network: critic-free PPO)."""
    return ppo_clip_loss(new_logprobs, batch, cfg)


# ---------------------------------------------------------------- SFT

@register("sft", advantage="none", needs_reward=False)
def sft_loss(new_logprobs: "Tensor", batch: Any, cfg: AlgoConfig) -> LossOutput:
    """Masked NLL of the response tokens (token-mean): behaviour cloning of the selected episodes."""
    import torch
    mask = batch.response_mask.to(new_logprobs.dtype)
    loss = _masked_mean(-new_logprobs, mask)
    kl = _reference_kl(new_logprobs, batch, mask, cfg)
    if kl is not None:
        loss = loss + cfg.kl_beta * kl
    n_tokens = float(mask.sum())
    with torch.no_grad():
        metrics = {"loss": float(loss), "clip_fraction": 0.0, "ratio_mean": math.nan,
                   "kl": float(kl) if kl is not None else math.nan,
                   **_common_metrics(new_logprobs, mask, n_tokens)}
    return LossOutput(loss, metrics)
