"""One optimizer step's work on one policy: minibatch updates over a ``Batch``, and its metrics.

``update_policy`` is the only place that runs forward/backward passes in training; the loop
(train_loop.py) times it separately from the rest of the step, which is how the trainer's
overhead is measured (bench/trainer.py).

torch is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .algorithms import AlgoConfig, Algorithm
from .policy import Policy, token_logprobs


@dataclass(frozen=True)
class UpdateConfig:
    epochs: int = 1          # passes over the batch
    minibatches: int = 2     # optimizer updates per pass
    grad_clip: float = 1.0   # max grad norm (0: off)
    seed: int = 0            # minibatch order


@dataclass
class UpdateResult:
    metrics: dict[str, float] = field(default_factory=dict)  # token-weighted means over the updates
    n_updates: int = 0
    n_tokens: int = 0          # response tokens in the batch
    update_s: float = 0.0      # wall seconds of forward/backward/optimizer work


def take(batch: Any, index: Any) -> Any:
    """Rows ``index`` (a LongTensor) of a Batch, cut to the longest kept row (less padding)."""
    import pyarrow as pa
    width = int(batch.attention_mask[index].sum(dim=1).max()) if len(index) else 0
    width = max(width, 1)
    sub = dataclasses.replace(
        batch,
        input_ids=batch.input_ids[index, :width], attention_mask=batch.attention_mask[index, :width],
        response_mask=batch.response_mask[index, :width], old_logprobs=batch.old_logprobs[index, :width],
        advantages=batch.advantages[index, :width], policy_versions=batch.policy_versions[index],
        episode_ids=[batch.episode_ids[i] for i in index.tolist()],
        rows=batch.rows.take(pa.array(index.tolist(), pa.int64())))
    ref = getattr(batch, "ref_logprobs", None)
    if ref is not None:
        sub.ref_logprobs = ref[index, :width]
    return sub


def reference_logprobs(policy: Policy, reference: Any, batch: Any) -> Any:
    """``[B, T]`` logprobs under the reference policy: the base model with adapters off (LoRA),
    or the frozen copy ``reference`` of the starting weights (full fine-tuning)."""
    import torch
    with torch.no_grad():
        if policy.lora is not None:
            with policy.model.disable_adapter():
                return token_logprobs(policy.model, batch)
        return token_logprobs(reference, batch)


def update_policy(policy: Policy, key: str | None, optimizer: Any, batch: Any, algorithm: Algorithm,
                  algo_cfg: AlgoConfig, cfg: UpdateConfig, reference: Any = None) -> UpdateResult:
    """``cfg.epochs`` passes of ``cfg.minibatches`` AdamW updates of policy ``key`` on ``batch``.

    Minibatches are row subsets in a seeded random order; the loss is the algorithm's
    token-mean over each minibatch's response tokens. Metrics are averaged over updates,
    weighted by their response-token counts.
    """
    import torch
    model = policy.activate(key)
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n_rows = batch.input_ids.shape[0]
    n_tokens = int(batch.response_mask.sum())
    result = UpdateResult(n_tokens=n_tokens)
    if n_rows == 0 or n_tokens == 0:
        return result
    gen = torch.Generator().manual_seed(cfg.seed)
    sums: dict[str, float] = {}
    weight = 0.0
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n_rows, generator=gen)
        for index in torch.tensor_split(order, min(cfg.minibatches, n_rows)):
            sub = take(batch, index)
            w = float(sub.response_mask.sum())
            if w == 0:
                continue
            if algo_cfg.kl_beta > 0:
                sub.ref_logprobs = reference_logprobs(policy, reference, sub)
            new = token_logprobs(model, sub)
            out = algorithm.loss(new, sub, algo_cfg)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                out.metrics["grad_norm"] = float(norm)
            optimizer.step()
            result.n_updates += 1
            for k, v in out.metrics.items():
                if isinstance(v, (int, float)) and not math.isnan(v) and k != "n_tokens":
                    sums[k] = sums.get(k, 0.0) + v * w
                elif k not in sums:
                    sums[k] = math.nan
            weight += w
    result.update_s = time.perf_counter() - t0
    result.metrics = {k: (v / weight if weight else math.nan) for k, v in sums.items()}
    return result


def make_optimizer(params: list[Any], lr: float, weight_decay: float = 0.0, beta2: float = 0.99) -> Any:
    import torch
    return torch.optim.AdamW([p for p in params if p.requires_grad] or params, lr=lr, betas=(0.9, beta2),
                             weight_decay=weight_decay)
