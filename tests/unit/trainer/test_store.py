"""The trainer reads the store through the collector-published views.sql."""

from __future__ import annotations

import pytest

from tracetrain.collector import reader
from tracetrain.trainer import store


def test_views_file_gives_the_trainer_the_same_views(tmp_path):
    data = tmp_path / "d'ata"  # a quote in the path must not break the SQL literals
    (data / "spans").mkdir(parents=True)
    reader.connect(data).close()  # publishes views.sql
    con = store.connect(data)
    try:
        names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"spans", "llm_calls", "episodes", "train_steps", "checkpoints"} <= names
        assert con.execute("SELECT count(*) FROM llm_calls").fetchone() == (0,)
    finally:
        con.close()


def test_missing_views_file_is_a_clear_error(tmp_path):
    with pytest.raises(store.StoreUnavailable, match="tracetrain collector --data"):
        store.connect(tmp_path)
