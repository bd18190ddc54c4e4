"""Background upkeep of the store: merge small files, drop expired partitions.

Group commits make many small files; readers pay per file, so each daemon merges
*its own* older parts within a partition into one ``compact-`` file. The merged
file lists its sources in its Parquet metadata, is renamed into place, then the
sources are deleted. A crash between the two steps is finished at the next start
(``finish_interrupted_compactions``), so no span is ever stored twice for good.
Merging also drops duplicate (trace_id, span_id) pairs within the merged files.

Retention removes whole ``date=`` partitions older than the cutoff; writers only
ever write today's partition, so this never races with a commit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracetrain.collector import store_layout as layout
from tracetrain.collector.metrics import CollectorMetrics
from tracetrain.collector.schema import LOG_SCHEMA, SPAN_SCHEMA
from tracetrain.collector.segment_io import fsync_file, write_parquet
from tracetrain.instrumentation import semconv as sc

logger = logging.getLogger(__name__)
SOURCES_KEY = "tracetrain.compacted_from"


def _sources_of(path: Path) -> list[str]:
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(SOURCES_KEY.encode())
    return json.loads(raw) if raw else []


def finish_interrupted_compactions(data_dir: Path, writer_id: str, table: str = layout.SPANS_DIR) -> int:
    """Delete sources that a committed compact file of this writer already holds."""
    removed = 0
    for path, name in layout.own_segments(data_dir, writer_id, table):
        if name.kind != "compact":
            continue
        for source in _sources_of(path):
            source_path = path.parent / source
            if source_path.exists():
                source_path.unlink()
                removed += 1
    return removed


def dedupe_spans(table: pa.Table) -> pa.Table:
    """Keep the first row of each (trace_id, span_id)."""
    keys = pc.binary_join_element_wise(table[sc.COL_TRACE_ID], table[sc.COL_SPAN_ID], "")
    if len(pc.unique(keys)) == len(keys):
        return table
    indices = pa.table({"k": keys, "i": pa.array(range(len(keys)), pa.int64())}).group_by(
        "k", use_threads=False).aggregate([("i", "min")])["i_min"]
    return table.take(pc.sort_indices(indices))


def dedupe_logs(table: pa.Table) -> pa.Table:
    """Keep the first row of each record_id (a log record retried after a crash)."""
    keys = table[sc.COL_RECORD_ID]
    if len(pc.unique(keys)) == len(keys):
        return table
    indices = pa.table({"k": keys, "i": pa.array(range(len(keys)), pa.int64())}).group_by(
        "k", use_threads=False).aggregate([("i", "min")])["i_min"]
    return table.take(pc.sort_indices(indices))


# What compaction reads and how it dedupes, per table directory.
TABLES = {layout.SPANS_DIR: (SPAN_SCHEMA, dedupe_spans), layout.LOGS_DIR: (LOG_SCHEMA, dedupe_logs)}


def compact_partition(
    directory: Path, writer_id: str, seq: int, min_files: int, min_age_s: float, max_bytes: int,
    small_file_bytes: int = 1 << 20, table_dir: str = layout.SPANS_DIR,
) -> int:
    """Merge this writer's old small files in one partition. Returns files merged.

    Only files under ``small_file_bytes`` are merged: under load group commits are
    already large, and rewriting them would only spend CPU the ingest path needs.
    """
    now = time.time()
    candidates = []
    for path in sorted(directory.glob("*.parquet")):
        name = layout.parse_segment_name(path.name)
        if name is None or name.writer != writer_id:
            continue
        stat = path.stat()
        if now - stat.st_mtime < min_age_s or stat.st_size >= small_file_bytes:
            continue
        candidates.append((name.seq, path, stat.st_size))
    candidates.sort()
    chosen, total = [], 0
    for _, path, size in candidates:
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    if len(chosen) < min_files:
        return 0
    schema, dedupe = TABLES[table_dir]
    table = pa.concat_tables(
        [pq.read_table(p, schema=schema) for p in chosen], promote_options="permissive")
    table = dedupe(table)
    tmp = directory / layout.temp_file_name(writer_id, seq)
    final = directory / layout.segment_file_name("compact", writer_id, seq)
    write_parquet(table, tmp, {SOURCES_KEY: json.dumps([p.name for p in chosen])})
    fsync_file(tmp)
    tmp.replace(final)
    layout.fsync_dir(directory)
    for path in chosen:
        path.unlink(missing_ok=True)
    layout.fsync_dir(directory)
    del table
    pa.default_memory_pool().release_unused()  # give the merge's buffers back to the OS
    return len(chosen)


def remove_expired_partitions(data_dir: Path, retention_days: float, today: dt.date | None = None) -> list[Path]:
    """Delete ``date=`` partitions older than ``retention_days``; returns what went."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    cutoff = today - dt.timedelta(days=retention_days)
    removed = []
    for directory in sorted(d for table in layout.TABLE_DIRS for d in (data_dir / table).glob("date=*")):
        if directory.name == "date=1970-01-01":  # the schema anchor (reader.SCHEMA_ANCHOR_DIR)
            continue
        try:
            day = dt.date.fromisoformat(directory.name.removeprefix("date="))
        except ValueError:
            continue
        if day < cutoff:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


class Compactor:
    """Runs compaction and retention on a timer in a background thread."""

    def __init__(
        self,
        data_dir: Path,
        writer_id: str,
        allocate_seq,
        metrics: CollectorMetrics,
        interval_s: float = 30.0,
        min_files: int = 8,
        min_age_s: float = 10.0,
        max_bytes: int = 16 << 20,
        retention_days: float | None = None,
    ) -> None:
        self.data_dir, self.writer_id, self.allocate_seq = data_dir, writer_id, allocate_seq
        self.metrics, self.interval_s = metrics, interval_s
        self.min_files, self.min_age_s, self.max_bytes = min_files, min_age_s, max_bytes
        self.retention_days = retention_days
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tracetrain-compactor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def run_once(self) -> int:
        merged = 0
        if self.retention_days is not None:
            for path in remove_expired_partitions(self.data_dir, self.retention_days):
                logger.info("retention: removed %s", path)
        for table_dir in layout.TABLE_DIRS:
            merged += self._compact_table(table_dir)
        return merged

    def _compact_table(self, table_dir: str) -> int:
        merged = 0
        for directory in sorted((self.data_dir / table_dir).glob("*/*")):
            if self._stop.is_set():
                break
            if directory.is_dir():
                n = compact_partition(directory, self.writer_id, self.allocate_seq(),
                                      self.min_files, self.min_age_s, self.max_bytes, table_dir=table_dir)
                merged += n
                self.metrics.compactions.inc(n)
        return merged

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # the daemon must keep serving; try again next round
                logger.exception("compaction round failed")
