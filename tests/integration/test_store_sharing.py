"""Readers in other processes while daemons write; several daemons on one directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from tests.conftest import make_collector
from tests.integration.spanfactory import EXPORT_METHOD, make_request
from tracetrain.collector.reader import connect, query
from tracetrain.collector.store_layout import StoreError


def _send(port: int, n_spans: int, service: str = "test-agent") -> list[str]:
    body, keys = make_request(n_spans, service=service)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.unary_unary(EXPORT_METHOD)(body, timeout=10)
    return keys


def test_other_processes_read_while_the_daemon_writes(collector, data_dir):
    keys = _send(collector.grpc_port, 25)
    # 1. The CLI, in another process, while the daemon still runs.
    out = subprocess.run([sys.executable, "-m", "tracetrain.collector", "sql", "--data", str(data_dir),
                          "--format", "csv", "SELECT count(*) AS n FROM spans"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['"n"', "25"]
    # 2. Plain duckdb on the documented glob, no tracetrain involved.
    script = textwrap.dedent(f"""
        import duckdb
        print(duckdb.sql("SELECT count(*) FROM read_parquet('{data_dir}/spans/*/*/*.parquet', "
                         "hive_partitioning=true, union_by_name=true)").fetchall()[0][0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "25"
    # 3. A long-lived connection sees spans acknowledged after it was opened.
    con = connect(data_dir)
    before = con.sql("SELECT count(*) FROM spans").fetchall()[0][0]
    more = _send(collector.grpc_port, 5)
    assert con.sql("SELECT count(*) FROM spans").fetchall()[0][0] == before + 5
    stored = {r[0] for r in con.sql("SELECT trace_id || span_id FROM spans").fetchall()}
    assert stored == set(keys) | set(more)


def test_json_and_pandas_outputs(collector, data_dir):
    _send(collector.grpc_port, 3, service="svc-a")
    out = subprocess.run([sys.executable, "-m", "tracetrain.collector", "sql", "--data", str(data_dir),
                          "--format", "json", "SELECT service_name, count(*) AS n FROM spans GROUP BY 1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == '{"service_name": "svc-a", "n": 3}'
    pandas_frame = query(data_dir, "SELECT * FROM spans").to_pandas()
    assert len(pandas_frame) == 3 and set(pandas_frame["service_name"]) == {"svc-a"}
    bad = subprocess.run([sys.executable, "-m", "tracetrain.collector", "sql", "--data", str(data_dir),
                          "SELECT nope FROM spans"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "SQL error" in bad.stderr and "Traceback" not in bad.stderr


def test_two_daemons_share_one_directory(data_dir):
    first = make_collector(data_dir)
    second = make_collector(data_dir)
    try:
        assert first.writer.writer_id != second.writer.writer_id
        keys = []
        for i in range(6):
            keys += _send(first.grpc_port, 10, service=f"svc-{i % 2}")
            keys += _send(second.grpc_port, 10, service=f"svc-{i % 2}")
        with pytest.raises(StoreError, match="in use"):
            make_collector(data_dir, writer_id=first.writer.writer_id)
        # Both compact their own files concurrently; neither touches the other's.
        first.compactor.min_age_s = second.compactor.min_age_s = 0
        first.compactor.min_files = second.compactor.min_files = 2
        assert first.compactor.run_once() > 0 and second.compactor.run_once() > 0
    finally:
        first.stop()
        second.stop()
    rows = query(data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist()
    assert sorted(rows) == sorted(keys)
    files = list((data_dir / "spans").glob("date=*/service=svc-*/*.parquet"))
    assert {f.name.split("-")[1] for f in files} == {first.writer.writer_id, second.writer.writer_id}
    assert all(f.name.startswith("compact-") for f in files)
