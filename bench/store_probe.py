#!/usr/bin/env python3
"""Read a tracetrain span store from outside the collector, for bench/ingest.py.

Two commands, both run as their own process so the reads never count as
collector CPU and always go through the files, as any reader would:

``count DATA [--json]``
    Print the number of distinct stored spans (``trace_id || span_id``); this is
    the harness's ``--verify-cmd``, so by default it prints the number alone.
    With ``--json`` print ``{"distinct", "rows", "duplicates", "files"}``, where
    ``duplicates = rows - distinct`` and ``files`` counts span files (part- and
    compact-), not the empty schema anchor.

``watch DATA``
    The lag-to-queryable poller. Line protocol on stdin/stdout::

        -> READY                      (views defined, first query done)
        <- WATCH <trace_hex> <span_hex> <timeout_s>
        -> ARMED
        -> SEEN <start_ns> <end_ns> <polls> <mean_poll_ms>
           or TIMEOUT <polls>
        <- QUIT

    It polls ``spans`` every ``--interval-ms`` until the span is there. start_ns
    and end_ns (wall clock) bracket the first query that found it: DuckDB lists
    the files when a query starts, so the span was visible by start_ns at the
    latest, and end_ns is when this reader had it in hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tracetrain.collector import reader
from tracetrain.collector import store_layout as layout

COUNT_SQL = "SELECT count(DISTINCT trace_id || span_id), count(*) FROM spans"
ATTEMPTS = 5


def _report(message: str, log_file: str | None) -> None:
    print(message, file=sys.stderr, flush=True)
    if log_file:  # the harness drops a verify command's stderr; this keeps the record
        with open(log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


def _count(data_dir: Path, log_file: str | None = None) -> tuple[int, int]:
    # A reader can list a file that the compactor deletes before it is read; that
    # is retried here, and reported (stderr and --log) so it stays visible.
    for attempt in range(1, ATTEMPTS + 1):
        try:
            row = reader.query(data_dir, COUNT_SQL).to_pylist()[0]
            return tuple(row.values())  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - any read error is retried, then re-raised
            _report(f"store_probe: count attempt {attempt} failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}", log_file)
            if attempt == ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def cmd_count(args: argparse.Namespace) -> int:
    data_dir = Path(args.data)
    if not (data_dir / layout.SPANS_DIR).is_dir():
        distinct, rows = 0, 0
    else:
        distinct, rows = _count(data_dir, args.log)
    if args.json:
        files = sum(1 for f in (data_dir / layout.SPANS_DIR).glob("*/*/*.parquet")
                    if layout.parse_segment_name(f.name)) if data_dir.exists() else 0
        print(json.dumps({"distinct": distinct, "rows": rows, "duplicates": rows - distinct, "files": files}))
    else:
        print(distinct)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    con = reader.connect(args.data)
    sql = "SELECT count(*) FROM spans WHERE trace_id = ? AND span_id = ?"
    con.execute(sql, ["", ""]).fetchone()  # warm up: first query plans and lists files
    interval = args.interval_ms / 1000.0
    print("READY", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "QUIT":
            break
        if parts[0] != "WATCH" or len(parts) != 4:
            print(f"ERROR bad command {line.strip()!r}", flush=True)
            continue
        trace_hex, span_hex, timeout_s = parts[1], parts[2], float(parts[3])
        print("ARMED", flush=True)
        deadline = time.monotonic() + timeout_s
        polls, poll_ns = 0, 0
        seen = None
        while time.monotonic() < deadline:
            polls += 1
            start_ns = time.time_ns()
            try:
                found = con.execute(sql, [trace_hex, span_hex]).fetchone()[0]
            except Exception as exc:  # noqa: BLE001 - a file vanished mid-query: poll again
                print(f"store_probe: poll failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                found = 0
            end_ns = time.time_ns()
            poll_ns += end_ns - start_ns
            if found:
                seen = (start_ns, end_ns)
                break
            time.sleep(interval)
        if seen:
            print(f"SEEN {seen[0]} {seen[1]} {polls} {poll_ns / polls / 1e6:.3f}", flush=True)
        else:
            print(f"TIMEOUT {polls}", flush=True)
    con.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("count", help="print the number of distinct stored spans")
    p.add_argument("data")
    p.add_argument("--json", action="store_true", help="distinct, rows, duplicates and files as JSON")
    p.add_argument("--log", default=None, help="append failed (retried) read attempts to this file")
    p.set_defaults(func=cmd_count)
    p = sub.add_parser("watch", help="lag-to-queryable poller (line protocol on stdin/stdout)")
    p.add_argument("data")
    p.add_argument("--interval-ms", type=float, default=2.0, help="sleep between polls")
    p.set_defaults(func=cmd_watch)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
