"""Write the training tables into the store: one immutable Parquet file per step / checkpoint.

``DATA/training/train_steps/run=<run_id>/step-<10 digits>.parquet`` and
``DATA/training/checkpoints/run=<run_id>/ckpt-<10 digits>.parquet``, columns exactly
``semconv.TRAIN_STEP_COLUMNS`` / ``CHECKPOINT_COLUMNS``, written to a temporary name,
fsynced and renamed (a reader never sees half a file; rewriting a step after a restart
replaces the file whole). Reading back goes through the store's views
(``store.connect(data).sql("SELECT * FROM train_steps")``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tracetrain.instrumentation import semconv as sc

_ARROW_TYPES = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
                "VARCHAR[]": pa.list_(pa.string()), "BIGINT[]": pa.list_(pa.int64())}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def arrow_schema(columns: tuple[tuple[str, str], ...]) -> pa.Schema:
    return pa.schema([(name, _ARROW_TYPES[kind]) for name, kind in columns])


TRAIN_STEP_SCHEMA = arrow_schema(sc.TRAIN_STEP_COLUMNS)
CHECKPOINT_SCHEMA = arrow_schema(sc.CHECKPOINT_COLUMNS)


def check_run_id(run_id: str) -> str:
    """A run id is a folder name (``run=<id>``): letters, digits, ``_ . -``, up to 128."""
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(f"run id {run_id!r} must match {_RUN_ID.pattern} (it names a folder)")
    return run_id


def _clean(value: Any) -> Any:
    """NaN -> NULL (a metric that was not computed)."""
    if isinstance(value, float) and value != value:
        return None
    return value


def _rows(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = [rows] if isinstance(rows, Mapping) else list(rows)
    if not rows:
        raise ValueError("no row to write")
    now = time.time_ns()
    return [{"time_unix_nano": now, **r} for r in rows]


def _write_row(data_dir: str | os.PathLike, table: str, schema: pa.Schema, rows: list[Mapping[str, Any]],
               stem: str) -> Path:
    row = rows[0]
    for r in rows:
        unknown = set(r) - set(schema.names)
        if unknown:
            raise ValueError(f"{table}: unknown columns {sorted(unknown)}")
        if (r["run_id"], r["step"]) != (row["run_id"], row["step"]):
            raise ValueError(f"{table}: rows of one file share run_id and step")
    run_id = check_run_id(str(row["run_id"]))
    values = {name: [_clean(r.get(name)) for r in rows] for name in schema.names}
    arrow = pa.table(values, schema=schema)
    directory = Path(data_dir) / sc.TRAINING_DIR / table / f"run={run_id}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}-{int(row['step']):010d}.parquet"
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pq.write_table(arrow, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_train_step(data_dir: str | os.PathLike, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Path:
    """The ``train_steps`` row of a step (one per policy when several agents train in one run).

    Missing columns are NULL, NaN metrics too; ``time_unix_nano`` defaults to now.
    """
    return _write_row(data_dir, sc.TABLE_TRAIN_STEPS, TRAIN_STEP_SCHEMA, _rows(rows), "step")


def write_checkpoint_row(data_dir: str | os.PathLike,
                         rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Path:
    """The ``checkpoints`` row(s) of a step with their lineage (episode ids, behaviour policy versions)."""
    return _write_row(data_dir, sc.TABLE_CHECKPOINTS, CHECKPOINT_SCHEMA, _rows(rows), "ckpt")
