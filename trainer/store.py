"""Open the span store for reading, from the trainer's side.

The trainer never imports the collector: it reads the store through the view SQL the
collector publishes in ``DATA/views.sql`` (``semconv.VIEWS_FILE``), so ``llm_calls``,
``episodes``, ``train_steps``... mean exactly what they mean in ``tracetrain sql``.
The connection is an in-memory DuckDB and takes no lock on the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb

from tracetrain.instrumentation import semconv as sc

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The directory is not a span store the trainer can read."""


def view_sql(data_dir: str | Path) -> str:
    """The store's view definitions with its real path filled in."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / sc.VIEWS_FILE
    if not path.is_file():
        raise StoreUnavailable(
            f"{data_dir} has no {sc.VIEWS_FILE}: it is not a tracetrain span store, or no collector has "
            f"opened it yet (start `tracetrain collector --data {data_dir}` once)")
    # the path sits inside SQL string literals
    return path.read_text().replace(sc.VIEWS_DATA_PLACEHOLDER, str(data_dir).replace("'", "''"))


def connect(data_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views defined."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(view_sql(data_dir))
    except duckdb.Error as exc:
        con.close()
        raise StoreUnavailable(f"cannot define the views of {data_dir}: {exc}") from None
    return con


def retry_listing(fn: Callable[[], T], attempts: int = 5, pause_s: float = 0.05) -> T:
    """Run ``fn``, retrying when a file vanished between listing and reading (compaction)."""
    for attempt in range(attempts):
        try:
            return fn()
        except duckdb.IOException as exc:
            if "No such file" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause_s * (attempt + 1))
    raise AssertionError("unreachable")


def listing_fingerprint(data_dir: str | Path) -> tuple[int, int, int]:
    """(files, total bytes, newest mtime ns) of the span table's Parquet files.

    Files are immutable and appear by rename (docs/schema.md), so an unchanged fingerprint
    means no new spans: an online trainer polls this (a directory scan) instead of
    re-running its queries over the whole store while it waits.
    """
    count = size = newest = 0
    for path in Path(data_dir).glob(f"{sc.TABLE_SPANS}/*/*/*.parquet"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # compacted away between listing and stat
            continue
        count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime_ns)
    return count, size, newest
