"""TLS on both ports, compaction, retention and `tracetrain gc`."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_collector
from tests.integration.spanfactory import EXPORT_METHOD, make_request
from tracetrain.collector.compactor import SOURCES_KEY, finish_interrupted_compactions
from tracetrain.collector.reader import query

AGENT = Path(__file__).parent / "agents" / "python_env_agent.py"


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_with_the_sdk_exporter(data_dir, certificate, protocol):
    cert, key = certificate
    daemon = make_collector(data_dir, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        port = daemon.grpc_port if protocol == "grpc" else daemon.http_port
        env = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://localhost:{port}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert),
               "OTEL_SERVICE_NAME": "tls-agent", "OTEL_EXPORTER_OTLP_TIMEOUT": "10"}
        out = subprocess.run([sys.executable, str(AGENT), "2"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        trace_id = json.loads(out.stdout)["trace_id"]
        # Plaintext to a TLS port fails instead of silently working.
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(EXPORT_METHOD)(make_request(1)[0], timeout=3)
    finally:
        daemon.stop()
    assert query(data_dir, "SELECT count(*) AS n FROM spans WHERE trace_id = $1", [trace_id])["n"][0].as_py() == 4


def _send(port: int, n: int) -> list[str]:
    body, keys = make_request(n)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.unary_unary(EXPORT_METHOD)(body, timeout=10)
    return keys


def test_compaction_merges_dedupes_and_recovers(collector, data_dir):
    keys = [k for _ in range(5) for k in _send(collector.grpc_port, 4)]
    partition = next((data_dir / "spans").glob("date=2*/service=test-agent"))
    parts = sorted(partition.glob("part-*.parquet"))
    assert len(parts) == 5
    # A duplicate file (as a crash between commit and reply could leave) is merged away.
    shutil.copy(parts[0], partition / "part-w0-000000000900.parquet")
    collector.compactor.min_age_s, collector.compactor.min_files = 0, 2
    merged = collector.compactor.run_once()
    assert merged == 6
    files = list(partition.glob("*.parquet"))
    assert len(files) == 1 and files[0].name.startswith("compact-")
    assert sorted(json.loads(pq.read_schema(files[0]).metadata[SOURCES_KEY.encode()])) == sorted(
        [p.name for p in parts] + ["part-w0-000000000900.parquet"])
    rows = query(data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist()
    assert sorted(rows) == sorted(keys)
    # A crash after the rename but before the sources were deleted: the restart finishes the job.
    shutil.copy(files[0], partition / "part-w0-000000000001.parquet")
    shutil.copy(files[0], partition / "part-w0-000000000002.parquet")
    assert finish_interrupted_compactions(data_dir, "w0") == 2
    assert sorted(query(data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist()) == sorted(keys)


def test_retention_and_gc_command_while_daemon_runs(collector, data_dir):
    keys = _send(collector.grpc_port, 3)
    today_dir = next((data_dir / "spans").glob("date=2*"))
    old_day = (dt.date.today() - dt.timedelta(days=40)).isoformat()
    old_dir = data_dir / "spans" / f"date={old_day}"
    shutil.copytree(today_dir, old_dir)
    assert query(data_dir, "SELECT count(*) AS n FROM spans")["n"][0].as_py() == 6
    dry = subprocess.run([sys.executable, "-m", "tracetrain.collector", "gc", "--data", str(data_dir),
                          "--retention-days", "30", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and f"date={old_day}" in dry.stdout and old_dir.exists()
    out = subprocess.run([sys.executable, "-m", "tracetrain.collector", "gc", "--data", str(data_dir),
                          "--retention-days", "30"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not old_dir.exists() and today_dir.exists()
    more = _send(collector.grpc_port, 2)  # the daemon keeps serving
    rows = query(data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist()
    assert sorted(rows) == sorted(keys + more)


def test_daemon_retention_option(data_dir):
    daemon = make_collector(data_dir, retention_days=1)
    try:
        _send(daemon.grpc_port, 2)
        old_dir = data_dir / "spans" / "date=2001-01-01" / "service=x"
        old_dir.mkdir(parents=True)
        daemon.compactor.run_once()
        assert not old_dir.parent.exists()
        assert query(data_dir, "SELECT count(*) AS n FROM spans")["n"][0].as_py() == 2
    finally:
        daemon.stop()
