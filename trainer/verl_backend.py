"""verl backend: the same transitions, fed to verl (DataProto) for multi-node training.

Runs in `.venv-verl` (`make verl-env`: verl 0.9.1 + Ray on torch 2.13.0); verl and torch are
imported inside the functions, so importing this module costs only NumPy/Arrow.

`to_dataproto` turns a transitions table (`tracetrain.trainer.transitions`) into a
`verl.protocol.DataProto` with verl's batch keys: each row is split at its first policy
token into a left-padded prompt and a right-padded response, the way verl's agent loop
lays out a batch. The GRPO group id `uid` is the row's task id, so `compute_grpo_advantages`
and `compute_advantage_like_ray_trainer` run verl's own `core_algos` on our rows.

Difference from `tracetrain.trainer.advantages.grpo`: verl normalizes one score per *row*
(response), ours one score per *episode*. With one row per episode (single-call
episodes, or multi-call episodes merged into one sequence) they agree; with several rows
per episode verl counts the episode several times in the group statistics. verl also keeps
zero-variance groups (advantage 0) and single-episode groups (the raw score), which ours
drops. See docs/scale-out.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# Per-row strings carried into DataProto.non_tensor_batch (object arrays of length B).
NON_TENSOR_COLUMNS = ("episode_id", "task_id", "rollout_id", "agent_name", "trace_id")
REQUIRED_COLUMNS = ("episode_id", "input_ids", "response_mask", "old_logprobs", "reward")


@dataclass(frozen=True)
class PaddedRows:
    """verl's layout of B rows, as NumPy arrays (P = prompt width, R = response width).

    prompts/prompt_mask: [B, P] left-padded; responses/response_mask/response_attention,
    old_logprobs, token_rewards: [B, R] right-padded; the reward sits on the last real
    response token (verl's reward managers put it at `valid_response_length - 1`).
    """

    prompts: np.ndarray  # int64 [B, P]
    prompt_mask: np.ndarray  # int64 [B, P], 1 on real prompt tokens
    responses: np.ndarray  # int64 [B, R]
    response_attention: np.ndarray  # int64 [B, R], 1 on real response tokens (policy or tool)
    response_mask: np.ndarray  # int64 [B, R], 1 on policy-sampled tokens only
    old_logprobs: np.ndarray  # float32 [B, R]
    token_rewards: np.ndarray  # float32 [B, R]
    advantages: np.ndarray | None  # float32 [B, R], row advantage on its policy tokens


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets [B+1]) of a list column, without a Python loop per token."""
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise ValueError(f"transitions column {name!r} has null rows")
    offsets = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def _first_policy_token(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[B] index (within its row) of each row's first token with mask 1; -1 when none."""
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    local = np.arange(len(mask)) - offsets[row]
    hits = np.flatnonzero(mask == 1)
    none = np.iinfo(np.int64).max
    first = np.full(len(lengths), none, dtype=np.int64)
    np.minimum.at(first, row[hits], local[hits])  # smallest local index per row
    return np.where(first == none, -1, first)


def _check_widths(n_prompt: np.ndarray, n_response: np.ndarray, width_p: int, width_r: int) -> None:
    for name, need, width in (("prompt", n_prompt, width_p), ("response", n_response, width_r)):
        over = np.flatnonzero(need > width)
        if len(over):
            raise ValueError(
                f"{len(over)} row(s) have a {name} longer than {width} tokens "
                f"(longest {int(need.max())}); drop them or raise max_{name}_len"
            )


def _row_values(transitions: pa.Table, response_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(rewards [B] float64, advantages [B,R] float32 or None when the column is absent/all null or NaN)."""
    rewards = transitions.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(rewards).any():
        raise ValueError("transitions column 'reward' has null/NaN rows")
    if "advantage" not in transitions.column_names:
        return rewards, None
    adv = transitions.column("advantage").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    if np.isnan(adv).all():  # not computed yet (build_transitions leaves it NaN)
        return rewards, None
    if np.isnan(adv).any():
        raise ValueError("transitions column 'advantage' is filled for some rows only (null/NaN in others)")
    return rewards, adv[:, None] * response_mask.astype(np.float32)


def pad_rows(
    transitions: pa.Table,
    pad_token_id: int,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
) -> PaddedRows:
    """Split and pad every row (see PaddedRows); widths default to the longest row.

    Raises ValueError on a missing column, a row without any policy token, a NaN reward or
    behaviour logprob, a partly filled `advantage` column, or a row whose prompt or response
    is longer than the given maximum (filter those rows upstream; the transitions builder
    counts them as `too_long`).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in transitions.column_names]
    if missing:
        raise ValueError(f"transitions table lacks columns {missing}")
    ids, offsets = _list_column(transitions, "input_ids")
    mask, mask_offsets = _list_column(transitions, "response_mask")
    logprobs, lp_offsets = _list_column(transitions, "old_logprobs")
    if not (np.array_equal(offsets, mask_offsets) and np.array_equal(offsets, lp_offsets)):
        raise ValueError("input_ids, response_mask and old_logprobs differ in length in some row")
    n_rows = transitions.num_rows
    lengths = np.diff(offsets)
    n_prompt = _first_policy_token(mask, offsets)
    if (n_prompt < 0).any():
        bad = transitions.column("episode_id").to_pylist()[int(np.flatnonzero(n_prompt < 0)[0])]
        raise ValueError(f"a row of episode {bad!r} has no policy token (response_mask all 0)")
    n_response = lengths - n_prompt
    width_p = int(n_prompt.max(initial=0)) if max_prompt_len is None else int(max_prompt_len)
    width_r = int(n_response.max(initial=0)) if max_response_len is None else int(max_response_len)
    _check_widths(n_prompt, n_response, width_p, width_r)

    row = np.repeat(np.arange(n_rows), lengths)
    local = np.arange(len(ids)) - offsets[row]
    in_prompt = local < n_prompt[row]
    # Prompt tokens are right-aligned (left padding); response tokens start at column 0.
    p_col = width_p - n_prompt[row[in_prompt]] + local[in_prompt]
    r_row, r_col = row[~in_prompt], local[~in_prompt] - n_prompt[row[~in_prompt]]

    prompts = np.full((n_rows, width_p), pad_token_id, dtype=np.int64)
    prompt_mask = np.zeros((n_rows, width_p), dtype=np.int64)
    prompts[row[in_prompt], p_col] = ids[in_prompt]
    prompt_mask[row[in_prompt], p_col] = 1
    responses = np.full((n_rows, width_r), pad_token_id, dtype=np.int64)
    response_attention = np.zeros((n_rows, width_r), dtype=np.int64)
    response_mask = np.zeros((n_rows, width_r), dtype=np.int64)
    old = np.zeros((n_rows, width_r), dtype=np.float32)
    responses[r_row, r_col] = ids[~in_prompt]
    response_attention[r_row, r_col] = 1
    response_mask[r_row, r_col] = mask[~in_prompt]
    old[r_row, r_col] = logprobs[~in_prompt]
    unknown = np.isnan(old).any(axis=1)
    if unknown.any():
        # tracetrain marks retokenized rows' logprobs NaN; verl has no such convention and
        # a NaN would poison its ratios and importance weights
        raise ValueError(
            f"{int(unknown.sum())} row(s) have unknown (NaN) behaviour logprobs (retokenized calls); "
            "drop them before handing the batch to verl"
        )

    rewards, advantages = _row_values(transitions, response_mask)
    token_rewards = np.zeros((n_rows, width_r), dtype=np.float32)
    token_rewards[np.arange(n_rows), n_response - 1] = rewards
    return PaddedRows(prompts, prompt_mask, responses, response_attention, response_mask, old, token_rewards, advantages)


def _non_tensor_batch(transitions: pa.Table) -> dict[str, np.ndarray]:
    """Object arrays of length B: uid (GRPO group) plus lineage columns."""
    out: dict[str, np.ndarray] = {}
    for name in NON_TENSOR_COLUMNS:
        if name in transitions.column_names:
            out[name] = np.array(transitions.column(name).to_pylist(), dtype=object)
    episodes = transitions.column("episode_id").to_pylist()
    tasks = out.get("task_id", np.array([None] * transitions.num_rows, dtype=object))
    # A row without a task is a group of its own episode (verl then uses its raw score).
    out["uid"] = np.array(
        [t if t is not None else f"episode:{e}" for t, e in zip(tasks, episodes)], dtype=object
    )
    for name in ("call_index", "policy_version"):
        if name in transitions.column_names:
            out[name] = np.array(transitions.column(name).to_pylist(), dtype=object)
    return out


def to_dataproto(
    transitions: pa.Table,
    pad_token_id: int,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    meta_info: dict[str, Any] | None = None,
    old_log_probs_from_rollout: bool = True,
):
    """transitions -> verl.protocol.DataProto (B rows; P/R = prompt/response widths).

    batch: prompts [B,P] (left-padded), responses [B,R] (right-padded), response_mask [B,R]
    (1 = policy token; merged tool/user turns and padding 0), input_ids / attention_mask /
    position_ids [B,P+R], rollout_log_probs [B,R] (the serving engine's behaviour logprobs),
    old_log_probs [B,R] = the same values when `old_log_probs_from_rollout` (verl's bypass
    mode; pass False when verl recomputes them, or its `union` would see two versions),
    rm_scores = token_level_scores = token_level_rewards [B,R] (row reward on the last real
    response token), advantages [B,R] when the table's `advantage` column is filled.
    non_tensor_batch: uid (= task_id, the GRPO group), episode_id, task_id, rollout_id,
    agent_name, trace_id, call_index, policy_version.
    meta_info: pad_token_id, global_token_num (per-row real tokens) plus `meta_info`.
    """
    import torch
    from verl.protocol import DataProto

    if transitions.num_rows == 0:
        raise ValueError("the transitions table is empty: nothing to hand to verl")
    rows = pad_rows(transitions, pad_token_id, max_prompt_len, max_response_len)
    input_ids = np.concatenate([rows.prompts, rows.responses], axis=1)
    attention = np.concatenate([rows.prompt_mask, rows.response_attention], axis=1)
    # verl.utils.model.compute_position_id_with_mask: positions count real tokens only.
    position_ids = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
    tensors = {
        "prompts": torch.from_numpy(rows.prompts),
        "responses": torch.from_numpy(rows.responses),
        "response_mask": torch.from_numpy(rows.response_mask),
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "position_ids": torch.from_numpy(position_ids),
        "rollout_log_probs": torch.from_numpy(rows.old_logprobs),
        "rm_scores": torch.from_numpy(rows.token_rewards),
        "token_level_scores": torch.from_numpy(rows.token_rewards.copy()),
        "token_level_rewards": torch.from_numpy(rows.token_rewards.copy()),
    }
    if old_log_probs_from_rollout:
        tensors["old_log_probs"] = torch.from_numpy(rows.old_logprobs.copy())
    if rows.advantages is not None:
        tensors["advantages"] = torch.from_numpy(rows.advantages)
    meta = {"pad_token_id": int(pad_token_id), "global_token_num": attention.sum(axis=1).tolist()}
    meta.update(meta_info or {})
    return DataProto.from_dict(tensors=tensors, non_tensors=_non_tensor_batch(transitions), meta_info=meta)


def compute_grpo_advantages(data, norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6):
    """verl's `core_algos.compute_grpo_outcome_advantage` on a DataProto from `to_dataproto`.

    Writes batch["advantages"] and batch["returns"] ([B,R], zero off response_mask) and
    returns the DataProto. Group = non_tensor_batch["uid"]; score = sum of
    token_level_rewards; (score - group mean) / (unbiased group std + epsilon).
    """
    from verl.trainer.ppo import core_algos

    advantages, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"],
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    return data


def compute_advantage_like_ray_trainer(data, norm_adv_by_std_in_grpo: bool = True):
    """The advantage step of verl's PPO trainer (`ray_trainer.compute_advantage`, GRPO)."""
    from verl.trainer.ppo.core_algos import AdvantageEstimator
    from verl.trainer.ppo.ray_trainer import compute_advantage

    return compute_advantage(
        data, adv_estimator=AdvantageEstimator.GRPO, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo
    )


def row_advantages(data) -> np.ndarray:
    """[B] float64: each row's scalar advantage (mean of batch["advantages"] over response_mask)."""
    adv = data.batch["advantages"].double().numpy()
    mask = data.batch["response_mask"].double().numpy()
    return (adv * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
