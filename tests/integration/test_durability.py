"""kill -9 during sustained ingestion: every acknowledged span is there, once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.integration.spanfactory import EXPORT_METHOD, make_request
from tracetrain.collector.reader import query

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(data_dir: Path, grpc_port: int, http_port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracetrain.collector", "collector", "--data", str(data_dir),
         "--grpc-endpoint", f"127.0.0.1:{grpc_port}", "--http-endpoint", f"127.0.0.1:{http_port}",
         "--writer-id", "w0"],
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", http_port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"collector did not start; see {log}")


class Sender(threading.Thread):
    """Sends unique spans until told to stop, retrying each request until acknowledged."""

    def __init__(self, port: int, stop: threading.Event, tag: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.tag = port, stop, tag
        self.acked: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        export = channel.unary_unary(EXPORT_METHOD)
        while not self.stop.is_set():
            body, keys = make_request(40, tag=self.tag)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    export(body, timeout=5)
                    self.acked.extend(keys)
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE:
                        self.errors.append(f"{exc.code()}: {exc.details()}")
                        return
                    time.sleep(0.05)
            else:
                self.errors.append("gave up after 60 s")
                return
        channel.close()


@pytest.mark.slow
def test_kill9_loses_no_acknowledged_span_and_duplicates_none(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "collector.log"
    grpc_port, http_port = free_port(), free_port()
    proc = start_daemon(data_dir, grpc_port, http_port, log)
    stop = threading.Event()
    senders = [Sender(grpc_port, stop, tag) for tag in range(4)]
    try:
        for sender in senders:
            sender.start()
        for _ in range(2):  # two crashes, each in the middle of sustained traffic
            time.sleep(2.5)
            acked_before = sum(len(s.acked) for s in senders)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert acked_before > 0
            time.sleep(0.3)
            proc = start_daemon(data_dir, grpc_port, http_port, log)
        time.sleep(2.0)
        stop.set()
        for sender in senders:
            sender.join(90)
        assert not any(sender.is_alive() for sender in senders)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    errors = [e for s in senders for e in s.errors]
    assert not errors, errors
    acked = {key for s in senders for key in s.acked}
    assert len(acked) == sum(len(s.acked) for s in senders)
    stored = query(data_dir, "SELECT trace_id || span_id AS k, count(*) AS n FROM spans GROUP BY k").to_pylist()
    counts = {row["k"]: row["n"] for row in stored}
    missing = acked - counts.keys()
    assert not missing, f"{len(missing)} acknowledged spans lost, e.g. {sorted(missing)[:3]}"
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} spans stored more than once"
    assert len(acked) > 1000  # the test really ran under load
    # Spans committed but never acknowledged (the crash ate the reply) may exist; they were retried,
    # so each such span is also in `acked` and stored once.
    assert counts.keys() >= acked
    assert "Traceback" not in log.read_text()
