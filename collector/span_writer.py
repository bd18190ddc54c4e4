"""Group commit of decoded spans into immutable Parquet files.

Receiver threads hand over decoded requests and wait; one writer thread takes
everything queued, writes one zstd Parquet file per (date, service) partition
(temp file, fsync, rename, fsync of the directory) and only then releases the
waiting requests, which acknowledge to their clients. So an acknowledged span is
on disk and already visible to readers: kill -9 at any moment loses nothing that
was acknowledged, and the lag from acknowledgement to queryable is zero.

Memory is bounded in bytes, not rows (a row cap let a reference receiver reach
2 GB, see shared/notes/peer-ingest.md): a request is admitted only while the
wire bytes of requests in flight stay under ``max_pending_bytes``; otherwise the
receiver answers with a retryable refusal.

After a restart the writer reads the span keys of the files it committed in its
last seconds, and for a while drops spans that arrive again with those keys: a
client whose acknowledgement was lost in the crash retries, and the spans are
stored once, not twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracetrain.collector import store_layout as layout
from tracetrain.collector.compactor import finish_interrupted_compactions
from tracetrain.collector.errors import RetryableError
from tracetrain.collector.metrics import CollectorMetrics
from tracetrain.collector.reader import write_views_file
from tracetrain.collector.segment_io import fsync_file, write_parquet
from tracetrain.collector.span_rows import DecodedRequest
from tracetrain.instrumentation import semconv as sc

logger = logging.getLogger(__name__)

@dataclass
class AdmissionTicket:
    """Wire bytes reserved for one request until it is committed or abandoned."""

    writer: "SpanWriter"
    nbytes: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.writer._release(self.nbytes)


@dataclass
class _Pending:
    decoded: DecodedRequest
    ticket: AdmissionTicket
    received_ns: int
    future: Future = field(default_factory=Future)


class SpanWriter:
    """Owns one writer id in a data directory and commits span batches to it."""

    def __init__(
        self,
        data_dir: Path,
        metrics: CollectorMetrics,
        writer_id: str | None = None,
        max_pending_bytes: int = 16 << 20,
        fsync: bool = True,
        dedup_window_s: float = 10.0,
        dedup_active_s: float = 300.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        layout.ensure_store(self.data_dir)
        write_views_file(self.data_dir)
        self._lock = layout.WriterLock(self.data_dir, writer_id)
        self.writer_id = self._lock.writer_id
        self.metrics = metrics
        self.max_pending_bytes = max_pending_bytes
        self.fsync = fsync
        self._pending_bytes = 0
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq_lock = threading.Lock()
        self._next_seq = 0
        self.recent_keys: set[str] | None = None
        self._recent_until = 0.0
        self._recover(dedup_window_s, dedup_active_s)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tracetrain-span-writer", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, then stop. Safe to call twice, or without start()."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_queued(RetryableError("collector is shutting down", 1.0))
        self._lock.release()

    def allocate_seq(self) -> int:
        with self._seq_lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    # ------------------------------------------------------------ admission

    def admit(self, nbytes: int) -> AdmissionTicket:
        """Reserve memory for a request of ``nbytes`` wire bytes, or refuse it.

        Raises:
            RetryableError: too many bytes in flight, or the writer is stopping.
        """
        with self._cond:
            if self._stopping:
                raise RetryableError("collector is shutting down", 1.0)
            # A lone request larger than the budget still goes through, or it never could.
            if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                self.metrics.pending_bytes.set(self._pending_bytes)
                raise RetryableError(
                    f"collector is busy ({self._pending_bytes} bytes in flight); retry later", 1.0)
            self._pending_bytes += nbytes
            self.metrics.pending_bytes.set(self._pending_bytes)
        return AdmissionTicket(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._pending_bytes -= nbytes
            self.metrics.pending_bytes.set(self._pending_bytes)

    def active_recent_keys(self) -> set[str] | None:
        """Span keys to drop as duplicates right now (only for a while after restart)."""
        if self.recent_keys is not None and time.monotonic() > self._recent_until:
            self.recent_keys = None
        return self.recent_keys

    def submit(self, decoded: DecodedRequest, ticket: AdmissionTicket, received_ns: int) -> Future:
        """Queue decoded spans for the next group commit.

        Returns a Future that resolves once they are durable (or fails with
        RetryableError if they could not be written).
        """
        pending = _Pending(decoded, ticket, received_ns)
        if not decoded.batches:
            ticket.release()
            pending.future.set_result(None)
            return pending.future
        with self._cond:
            if self._stopping:
                ticket.release()
                raise RetryableError("collector is shutting down", 1.0)
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    # ------------------------------------------------------------ commit loop

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
                items = list(self._queue)
                self._queue.clear()
            self._commit(items)

    def _commit(self, items: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            nbytes, nfiles = self._write_partitions(items)
        except Exception as exc:  # disk full, permissions...: the client may retry
            logger.exception("group commit of %d requests failed", len(items))
            self.metrics.commit_failures.inc()
            for item in items:
                item.ticket.release()
                item.future.set_exception(RetryableError(f"storage error: {exc}", 2.0))
            return
        committed_ns = time.time_ns()
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.bytes_written.inc(nbytes)
        self.metrics.files_written.inc(nfiles)
        for item in items:
            self.metrics.lag_to_queryable_seconds.observe(max(0, committed_ns - item.received_ns) / 1e9)
            item.ticket.release()
            item.future.set_result(None)

    def _write_partitions(self, items: list[_Pending]) -> tuple[int, int]:
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        by_service: dict[tuple[str, str], list[pa.RecordBatch]] = {}
        for item in items:
            for service, batch in item.decoded.batches:  # spans, or log records (decoded.table)
                by_service.setdefault((item.decoded.table, service), []).append(batch)
        written: list[tuple[Path, Path]] = []
        total_bytes = 0
        try:
            for (table, service), batches in by_service.items():
                directory = layout.partition_dir(self.data_dir, date, service, table)
                new_dir = not directory.exists()
                directory.mkdir(parents=True, exist_ok=True)
                if new_dir and self.fsync:
                    layout.fsync_dir(directory.parent)
                    layout.fsync_dir(directory.parent.parent)
                seq = self.allocate_seq()
                tmp = directory / layout.temp_file_name(self.writer_id, seq)
                final = directory / layout.segment_file_name("part", self.writer_id, seq)
                write_parquet(pa.Table.from_batches(batches, batches[0].schema), tmp)
                if self.fsync:
                    fsync_file(tmp)
                written.append((tmp, final))
                total_bytes += tmp.stat().st_size
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in written:
            os.replace(tmp, final)
        if self.fsync:
            for directory in {final.parent for _, final in written}:
                layout.fsync_dir(directory)
        return total_bytes, len(written)

    def _fail_queued(self, error: Exception) -> None:
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
        for item in items:
            item.ticket.release()
            item.future.set_exception(error)

    # ------------------------------------------------------------ recovery

    def _recover(self, dedup_window_s: float, dedup_active_s: float) -> None:
        """Clean up after a crash: temp files, half-finished compactions, duplicates."""
        for table in layout.TABLE_DIRS:
            for tmp in layout.own_temp_files(self.data_dir, self.writer_id, table):
                tmp.unlink(missing_ok=True)
            finish_interrupted_compactions(self.data_dir, self.writer_id, table)
        # One seq space for all tables: the next file must not reuse any table's name.
        last_seqs = [segs[-1][1].seq for segs in (layout.own_segments(self.data_dir, self.writer_id, table)
                                                  for table in layout.TABLE_DIRS) if segs]
        self._next_seq = max(last_seqs) + 1 if last_seqs else 0
        # Only span keys guard against retried duplicates (a log record shares its span's key).
        segments = [(p, n) for p, n in layout.own_segments(self.data_dir, self.writer_id) if p.exists()]
        parts = [(p, p.stat().st_mtime) for p, n in segments if n.kind == "part"]
        if not parts:
            return
        newest = max(mtime for _, mtime in parts)
        recent = [p for p, mtime in parts if mtime >= newest - dedup_window_s]
        keys: set[str] = set()
        for path in recent:
            table = pq.read_table(path, columns=[sc.COL_TRACE_ID, sc.COL_SPAN_ID])
            keys.update(t + s for t, s in zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
        self.recent_keys = keys
        self._recent_until = time.monotonic() + dedup_active_s
        logger.info("writer %s recovered: next seq %d, %d recent span keys guard against retried duplicates",
                    self.writer_id, self._next_seq, len(keys))
