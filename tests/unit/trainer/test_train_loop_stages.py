"""The loop's pure stages: batch planning by complete groups, the watermark, decided episodes, stats."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from tracetrain.trainer.train_config import TrainConfig
from tracetrain.trainer.train_loop import (RunState, advance_watermark, batch_stats, decided_episodes,
                                           plan_batches)


def rows(spec: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"episode_id": [e for e, _ in spec], "task_id": [t for _, t in spec]})


def test_grouped_batches_hold_complete_groups_only():
    table = rows([(f"a{i}", "A") for i in range(5)] + [(f"b{i}", "B") for i in range(4)]
                 + [(f"c{i}", "C") for i in range(8)])
    cfg = TrainConfig(group_size=4, batch_episodes=8)
    batches, skips = plan_batches(table, cfg, grouped=True, complete_only=True)
    assert batches == [[f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)], [f"c{i}" for i in range(8)]]
    assert skips == {"incomplete_group": 1}
    batches, skips = plan_batches(table.slice(0, 9), cfg, grouped=True, complete_only=True)
    assert len(batches) == 1
    batches, skips = plan_batches(table.slice(0, 5), cfg, grouped=True, complete_only=True)
    assert batches == [] and skips == {"incomplete_group": 1, "batch_not_full": 4}
    batches, _ = plan_batches(table.slice(0, 5), cfg, grouped=True, complete_only=False)  # offline: a short batch
    assert batches == [[f"a{i}" for i in range(4)]]
    shuffled, _ = plan_batches(table, cfg, grouped=True, complete_only=False, rng=np.random.default_rng(1))
    in_order, _ = plan_batches(table, cfg, grouped=True, complete_only=False)
    assert sorted(sum(shuffled, [])) == sorted(sum(in_order, [])) and len(sum(in_order, [])) == 16
    assert all(len(b) % 4 == 0 for b in shuffled)


def test_ungrouped_batches_by_arrival():
    table = rows([(f"e{i}", None) for i in range(5)])
    batches, skips = plan_batches(table, TrainConfig(batch_episodes=2, group_size=1, algo="ppo"), grouped=False,
                                  complete_only=True)
    assert batches == [["e0", "e1"], ["e2", "e3"]] and skips == {"batch_not_full": 1}


def calls(spec: list[tuple[str, int, float | None]]) -> pa.Table:
    return pa.table({"episode_id": [e for e, _, _ in spec], "episode_end_time_unix_nano": [t for _, t, _ in spec],
                     "episode_reward": pa.array([r for _, _, r in spec], pa.float64())})


def test_watermark_moves_over_the_consumed_prefix_only():
    table = calls([("e1", 10, 1.0), ("e1", 10, 1.0), ("e2", 20, 0.0), ("e3", 30, None), ("e4", 40, 1.0)])
    wm, rest = advance_watermark(table, {"e1", "e2", "e4"}, None)
    assert wm == (20, "e2") and rest == {"e4"}  # e3 (no reward yet) holds it; e4 stays listed
    wm, rest = advance_watermark(table, {"e1", "e2", "e3", "e4"}, None)
    assert wm == (40, "e4") and rest == set()
    assert advance_watermark(table, {"e2"}, (5, "e0")) == ((5, "e0"), {"e2"})


def test_decided_episodes_have_a_reward_but_no_trainable_call():
    table = calls([("e1", 10, 1.0), ("e2", 20, None), ("e3", 30, 0.0)])
    assert decided_episodes(table, rows([("e1", "T")])) == {"e3"}


def test_batch_stats_per_episode():
    t = pa.table({"episode_id": ["a", "a", "b", "c"], "episode_reward": [1.0, 1.0, 0.0, 0.5],
                  "reward": [1.0, 1.0, 0.0, 0.5], "policy_version": pa.array([3, 3, 1, None], pa.int64()),
                  "n_response_tokens": pa.array([5, 6, 7, 8], pa.int32())})
    s = batch_stats(t, success_threshold=0.5, current_version=4)
    assert (s["n_episodes"], s["n_transitions"], s["n_tokens"]) == (3, 4, 26)
    assert s["reward_mean"] == 0.5 and s["success_rate"] == 2 / 3
    assert s["staleness_mean"] == (1 + 1 + 3) / 3
    assert math.isnan(batch_stats(t, 1.0, None)["staleness_mean"])


def test_run_state_round_trips():
    s = RunState("r", step=3, watermark=(10, "e"), consumed={"x"}, policy_version=2)
    assert RunState.from_json(s.to_json()) == s
