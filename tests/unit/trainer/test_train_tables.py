"""train_steps / checkpoints files: exact columns, atomic writes, read back through the store's views."""

from __future__ import annotations

import math

import pytest

from tracetrain.collector.reader import write_views_file
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import store
from tracetrain.trainer.train_tables import (CHECKPOINT_SCHEMA, TRAIN_STEP_SCHEMA, write_checkpoint_row,
                                             write_train_step)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "spans").mkdir()
    write_views_file(tmp_path)
    return tmp_path


def test_schemas_are_the_contract():
    assert TRAIN_STEP_SCHEMA.names == [n for n, _ in sc.TRAIN_STEP_COLUMNS]
    assert CHECKPOINT_SCHEMA.names == [n for n, _ in sc.CHECKPOINT_COLUMNS]


def test_rows_round_trip_through_the_views(data):
    path = write_train_step(data, {"run_id": "r1", "step": 3, "algo": "grpo", "n_episodes": 64, "loss": -0.5,
                                   "kl": math.nan, "skipped": '{"no_reward": 2}'})
    assert path.name == "step-0000000003.parquet" and path.parent.name == "run=r1"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    write_train_step(data, [{"run_id": "r2", "step": 1, "agent_name": "a", "loss": 1.0},
                            {"run_id": "r2", "step": 1, "agent_name": "b", "loss": 2.0}])
    write_checkpoint_row(data, {"run_id": "r1", "step": 3, "policy_version": 7, "path": "/ckpt",
                                "episode_ids": ["e1", "e2"], "trained_policy_versions": [5, 6]})
    con = store.connect(data)
    rows = con.sql("SELECT run_id, step, algo, n_episodes, loss, kl, skipped, time_unix_nano > 0 "
                   "FROM train_steps WHERE run_id IS NOT NULL ORDER BY run_id, agent_name").fetchall()
    assert rows[0] == ("r1", 3, "grpo", 64, -0.5, None, '{"no_reward": 2}', True)  # NaN -> NULL
    assert [(r[0], r[4]) for r in rows[1:]] == [("r2", 1.0), ("r2", 2.0)]
    assert con.sql("SELECT episode_ids, trained_policy_versions, policy_version FROM checkpoints "
                   "WHERE run_id = 'r1'").fetchall() == [(["e1", "e2"], [5, 6], 7)]
    # rewriting a step (a restarted run) replaces the file whole
    write_train_step(data, {"run_id": "r1", "step": 3, "loss": 0.25})
    assert con.sql("SELECT loss FROM train_steps WHERE run_id = 'r1'").fetchall() == [(0.25,)]


def test_bad_rows_are_refused(data):
    with pytest.raises(ValueError, match="unknown columns"):
        write_train_step(data, {"run_id": "r", "step": 1, "lossy": 1.0})
    with pytest.raises(ValueError, match="run id"):
        write_train_step(data, {"run_id": "../evil", "step": 1})
    with pytest.raises(ValueError, match="share run_id and step"):
        write_train_step(data, [{"run_id": "r", "step": 1}, {"run_id": "r", "step": 2}])
