"""Where things live in a data directory, and who may write what.

::

    DATA/
      store.json                          schema version, layout version
      spans/date=YYYY-MM-DD/service=NAME/
        part-<writer>-<seq>.parquet       one group commit (immutable)
        compact-<writer>-<seq>.parquet    merged parts (immutable, lists its sources)
        .tmp-<writer>-<seq>.parquet       being written; never read, removed on restart
      _writers/<writer>.lock              held (flock) by the daemon using that writer id

Readers glob ``spans/*/*/*.parquet`` and see the union of every writer's files;
files appear by atomic rename only, so a reader never sees a half-written one.
Each daemon owns one writer id, so several daemons can share a directory (or an
object-store prefix mounted as one) without touching each other's files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tracetrain.instrumentation import semconv as sc

LAYOUT_VERSION = 1
SPANS_DIR = "spans"
LOGS_DIR = "logs"
TABLE_DIRS = (SPANS_DIR, LOGS_DIR)
"""Every table a writer writes; each is laid out like ``spans/`` (one seq space per writer)."""
WRITERS_DIR = "_writers"
STORE_FILE = "store.json"
_FILE_RE = re.compile(r"^(part|compact)-(?P<writer>[A-Za-z0-9_.]+)-(?P<seq>\d{12})\.parquet$")
_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_.]{1,64}$")


class StoreError(Exception):
    """The data directory is unusable (wrong version, not writable, id taken)."""


@dataclass(frozen=True)
class SegmentName:
    """A parsed span-file name."""

    kind: str  # "part" or "compact"
    writer: str
    seq: int


def parse_segment_name(name: str) -> SegmentName | None:
    """Parse ``part-w0-000000000042.parquet``; None for anything else."""
    match = _FILE_RE.match(name)
    if not match:
        return None
    return SegmentName(match.group(1), match.group("writer"), int(match.group("seq")))


def segment_file_name(kind: str, writer: str, seq: int) -> str:
    return f"{kind}-{writer}-{seq:012d}.parquet"


def temp_file_name(writer: str, seq: int) -> str:
    # A leading dot and a non-.parquet suffix keep half-written files out of globs.
    return f".tmp-{writer}-{seq:012d}.parquet.tmp"


def partition_dir(data_dir: Path, date: str, service: str, table: str = SPANS_DIR) -> Path:
    """``spans/date=.../service=...`` (or ``logs/...``); the service is %-escaped as Hive does."""
    escaped = urllib.parse.quote(service, safe="") or "unknown_service"
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    return data_dir / table / f"date={date}" / f"service={escaped}"


def spans_glob(data_dir: Path) -> str:
    return str(data_dir / SPANS_DIR / "*" / "*" / "*.parquet")


def logs_glob(data_dir: Path) -> str:
    return str(data_dir / LOGS_DIR / "*" / "*" / "*.parquet")


def ensure_store(data_dir: Path) -> None:
    """Create the directory layout, or check an existing one is readable by us."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SPANS_DIR).mkdir(exist_ok=True)
    (data_dir / WRITERS_DIR).mkdir(exist_ok=True)
    store_file = data_dir / STORE_FILE
    wanted = {"layout_version": LAYOUT_VERSION, "schema_version": sc.SCHEMA_VERSION}
    if store_file.exists():
        try:
            found = json.loads(store_file.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{store_file} is unreadable: {exc}") from None
        if found.get("layout_version") != LAYOUT_VERSION:
            raise StoreError(f"{data_dir} has layout version {found.get('layout_version')}, "
                             f"this tracetrain writes {LAYOUT_VERSION}")
        if found.get("schema_version", 0) > sc.SCHEMA_VERSION:
            raise StoreError(f"{data_dir} holds schema version {found['schema_version']}, newer than "
                             f"this tracetrain's {sc.SCHEMA_VERSION}: upgrade tracetrain")
        if found.get("schema_version") == sc.SCHEMA_VERSION:
            return
    atomic_write_text(store_file, json.dumps(wanted, indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriterLock:
    """An exclusive claim on a writer id inside a data directory (``flock``).

    The kernel drops the lock when the process dies, kill -9 included, so a
    restarted daemon gets its old id back and can recover its own files.
    """

    def __init__(self, data_dir: Path, writer_id: str | None) -> None:
        self._fd: int | None = None
        if writer_id is not None:
            if not _WRITER_ID_RE.match(writer_id):
                raise StoreError(f"writer id {writer_id!r} must match {_WRITER_ID_RE.pattern}")
            if not self._try(data_dir, writer_id):
                raise StoreError(f"writer id {writer_id!r} is in use by another daemon on {data_dir}")
            self.writer_id = writer_id
            return
        for n in range(1024):
            if self._try(data_dir, f"w{n}"):
                self.writer_id = f"w{n}"
                return
        raise StoreError(f"no free writer id in {data_dir / WRITERS_DIR}")

    def _try(self, data_dir: Path, writer_id: str) -> bool:
        fd = os.open(data_dir / WRITERS_DIR / f"{writer_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def own_segments(data_dir: Path, writer_id: str, table: str = SPANS_DIR) -> list[tuple[Path, SegmentName]]:
    """Every committed file of one writer in one table, in sequence order."""
    found = []
    for path in (data_dir / table).glob("*/*/*.parquet"):
        name = parse_segment_name(path.name)
        if name is not None and name.writer == writer_id:
            found.append((path, name))
    found.sort(key=lambda item: item[1].seq)
    return found


def own_temp_files(data_dir: Path, writer_id: str, table: str = SPANS_DIR) -> list[Path]:
    return list((data_dir / table).glob(f"*/*/.tmp-{writer_id}-*.parquet.tmp"))
