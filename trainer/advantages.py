"""Advantages over a transitions table (pure functions: a table in, a new table out).

* ``grpo``: group-relative advantages. Episodes are grouped by ``task_id``; each episode
  counts once in its group's mean and standard deviation, however many rows (calls) it has,
  and its advantage is broadcast to all its rows. Groups whose episodes all have the same
  score carry no signal and are dropped (``zero_variance_group``, counted in episodes).
* ``baseline``: for PPO without a value network: the episode score minus the mean score of
  the task's episodes, discounted by ``gamma`` per call before the episode's last call.

An episode's score is its ``episode_reward``, or when that is NULL (per-call rewards) the
``reward`` (return) of its first row.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _episodes(table: pa.Table, null_task_alone: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(episode number per row, score per episode, group number per episode)."""
    episode_ids = table["episode_id"].combine_chunks()
    encoded = pc.dictionary_encode(episode_ids)
    row_episode = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_episodes = len(encoded.dictionary)
    first_row = np.full(n_episodes, len(row_episode), dtype=np.int64)
    np.minimum.at(first_row, row_episode, np.arange(len(row_episode)))
    head = table.select(["episode_id", "task_id", "episode_reward", "reward"]).take(pa.array(first_row, pa.int64()))
    score = pc.fill_null(head["episode_reward"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    fallback = pc.fill_null(head["reward"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    score = np.where(np.isnan(score), fallback, score)
    task = head["task_id"]
    if null_task_alone:
        # an episode without a task is its own group: distinct keys no task id can collide with
        key = pc.if_else(task.is_null(), pc.binary_join_element_wise("\x00episode:", head["episode_id"], ""), task)
    else:
        key = pc.fill_null(task, "\x00no-task")
    group = pc.dictionary_encode(key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key)
    return row_episode, score, group.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _group_stats(score: np.ndarray, group: np.ndarray, n_groups: int,
                 ddof: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, std) per group over its episodes' scores."""
    count = np.bincount(group, minlength=n_groups).astype(np.float64)
    mean = np.bincount(group, weights=score, minlength=n_groups) / np.maximum(count, 1)
    squares = np.bincount(group, weights=(score - mean[group]) ** 2, minlength=n_groups)
    std = np.sqrt(squares / np.maximum(count - ddof, 1))
    return count, mean, std


def _with_advantage(table: pa.Table, advantage: np.ndarray) -> pa.Table:
    index = table.schema.get_field_index("advantage")
    column = pa.array(advantage.astype(np.float32), pa.float32())
    if index < 0:
        return table.append_column("advantage", column)
    return table.set_column(index, "advantage", column)


def grpo(table: pa.Table, eps: float = 1e-4) -> tuple[pa.Table, collections.Counter]:
    """GRPO advantages: (score - group mean) / (group std + eps), std with Bessel's correction.

    Rows of zero-variance groups (all scores equal, or a single episode) are removed and
    their episodes counted under ``zero_variance_group``; rows whose score is NaN likewise
    under ``no_reward``. Returns the kept rows with ``advantage`` filled, and the counts.
    """
    counts: collections.Counter = collections.Counter()
    if table.num_rows == 0:
        return table, counts
    row_episode, score, group = _episodes(table, null_task_alone=True)
    no_score = np.isnan(score)
    counts["no_reward"] += int(no_score.sum())
    group = np.where(no_score, -1, group)
    valid = group >= 0
    n_groups = int(group.max()) + 1
    _count, mean, std = _group_stats(score[valid], group[valid], n_groups, ddof=1)
    spread = np.zeros(n_groups)
    if valid.any():
        low = np.full(n_groups, np.inf)
        high = np.full(n_groups, -np.inf)
        np.minimum.at(low, group[valid], score[valid])
        np.maximum.at(high, group[valid], score[valid])
        spread = high - low
    keep_episode = valid.copy()
    keep_episode[valid] = spread[group[valid]] > 0
    counts["zero_variance_group"] += int((valid & ~keep_episode).sum())
    advantage = np.zeros(len(score))
    g = group[keep_episode]
    advantage[keep_episode] = (score[keep_episode] - mean[g]) / (std[g] + eps)
    keep_row = keep_episode[row_episode]
    out = _with_advantage(table, advantage[row_episode])
    return (out if keep_row.all() else out.filter(pa.array(keep_row))), +counts


def baseline(table: pa.Table, gamma: float = 1.0) -> tuple[pa.Table, collections.Counter]:
    """Advantage = (score - mean score of the task's episodes) * gamma ** calls_to_end.

    Episodes without a task id share one group. Rows whose score is NaN are removed
    (``no_reward``); nothing else is dropped (a zero advantage is still a valid one).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], not {gamma}")
    counts: collections.Counter = collections.Counter()
    if table.num_rows == 0:
        return table, counts
    row_episode, score, group = _episodes(table, null_task_alone=False)
    valid = ~np.isnan(score)
    counts["no_reward"] += int((~valid).sum())
    _count, mean, _std = _group_stats(score[valid], group[valid], int(group.max()) + 1, ddof=0)
    advantage = np.where(valid, score - mean[group], 0.0)
    to_end = pc.fill_null(table["calls_to_end"], 0).to_numpy(zero_copy_only=False).astype(np.float64) \
        if "calls_to_end" in table.column_names else np.zeros(table.num_rows)
    row_advantage = advantage[row_episode] * np.power(gamma, to_end)
    out = _with_advantage(table, row_advantage)
    return (out if valid.all() else out.filter(pa.array(valid[row_episode]))), +counts
