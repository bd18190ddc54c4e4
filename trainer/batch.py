"""A transitions table as padded tensors (docs/training.md "Transitions").

Position convention: ``old_logprobs[b, t]`` is the behaviour log-probability of
``input_ids[b, t]``; the model's logprob of token t comes from its logits at t-1, so
``policy.token_logprobs`` fills positions t >= 1 and 0 at t = 0 (position 0 is never a
response token: every call has at least one prompt token).

``old_logprobs`` is NaN at response positions whose behaviour logprob is unknown (calls
re-tokenized from messages, or kept with ``missing_logprobs="recompute"``):
``resolve_old_logprobs`` replaces them with the current policy's detached logprobs, which
makes the importance ratio of those tokens exactly 1.

torch is imported inside the functions: the CLI imports this module at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """B rows of T positions, right-padded."""

    input_ids: torch.LongTensor        # [B, T] right-padded with pad_token_id
    attention_mask: torch.LongTensor   # [B, T] 1 on real tokens
    response_mask: torch.FloatTensor   # [B, T] 1.0 where input_ids[b, t] is a trained policy token
    old_logprobs: torch.FloatTensor    # [B, T] behaviour logprob of input_ids[b, t] (0 where mask 0, NaN unknown)
    advantages: torch.FloatTensor      # [B, T] row advantage broadcast over its response tokens
    policy_versions: torch.LongTensor  # [B] (-1 when unknown)
    episode_ids: list[str]               # len B
    rows: pa.Table                       # the transitions rows, for lineage and metrics


def _flat(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    values = pc.list_flatten(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def to_batch(transitions: pa.Table, pad_token_id: int, max_len: int | None = None) -> Batch:
    """Pad the rows of a transitions table into one batch.

    Args:
        transitions: rows from ``transitions.build_transitions`` (``advantage`` NULL/NaN -> 0).
        pad_token_id: id written after each row's last token (attention_mask 0 there).
        max_len: pad every row to exactly this many positions (fixed shapes); None: to the
            longest row.

    Raises:
        ValueError: a row is longer than ``max_len`` (build transitions with the same
            ``max_len`` to drop such calls as ``too_long`` instead).
    """
    import torch

    lengths = pc.fill_null(pc.list_value_length(transitions["input_ids"]), 0).to_numpy(
        zero_copy_only=False).astype(np.int64)
    n_rows = len(lengths)
    longest = int(lengths.max()) if n_rows else 0
    if max_len is not None and longest > max_len:
        raise ValueError(f"a transition has {longest} tokens, more than max_len={max_len}")
    width = max_len if max_len is not None else longest
    starts = np.zeros(n_rows, dtype=np.int64)
    if n_rows > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    # flat index of every real token in the [B, T] array
    row = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    flat_index = row * width + position

    def padded(values: np.ndarray, fill: float, dtype: type) -> np.ndarray:
        out = np.full(n_rows * width, fill, dtype=dtype)
        out[flat_index] = values
        return out.reshape(n_rows, width)

    ids = padded(_flat(transitions["input_ids"], np.int64), pad_token_id, np.int64)
    attention = padded(np.ones(len(flat_index), dtype=np.int64), 0, np.int64)
    mask = padded(_flat(transitions["response_mask"], np.float32), 0.0, np.float32)
    old = padded(_flat(transitions["old_logprobs"], np.float32), 0.0, np.float32)
    advantage = pc.fill_null(transitions["advantage"], 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
    advantage = np.nan_to_num(advantage, nan=0.0)
    versions = pc.fill_null(transitions["policy_version"], -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attention),
        response_mask=torch.from_numpy(mask),
        old_logprobs=torch.from_numpy(old),
        advantages=torch.from_numpy(advantage[:, None] * mask),
        policy_versions=torch.from_numpy(versions),
        episode_ids=[str(e) for e in transitions["episode_id"].to_pylist()],
        rows=transitions,
    )


def resolve_old_logprobs(batch: Batch, new_logprobs: torch.Tensor) -> torch.Tensor:
    """``batch.old_logprobs`` with unknown (NaN) entries replaced by ``new_logprobs.detach()``.

    new_logprobs: [B, T], same position convention. Returns [B, T].
    """
    import torch

    old = batch.old_logprobs.to(new_logprobs.device)
    return torch.where(torch.isnan(old), new_logprobs.detach().to(old.dtype), old)
