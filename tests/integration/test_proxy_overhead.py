"""What the proxy adds to a call's latency against the fake upstream (figures printed with -s).

The collector and the proxy run as their own processes, as in production, so the
figures are the proxy's own cost and not GIL contention with the test process.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.fake_upstream import FakeVllm
from tracetrain.collector.reader import query

CALLS = int(os.environ.get("TT_PROXY_BENCH_CALLS", "100"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _start(args: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    """A `tracetrain ...` process and the first match of ``pattern`` in its stderr."""
    process = subprocess.Popen([sys.executable, "-m", "tracetrain.collector", *args], stderr=subprocess.PIPE,
                               text=True, env=ENV)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(pattern, line)
        if match:
            return process, match[1]
        assert line or process.poll() is None, "process exited before it was ready"
    raise AssertionError(f"no line matching {pattern!r}")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        process.kill()


def _latencies_ms(url: str, body: bytes, stream: bool) -> list[float]:
    """Per-call wall time on one keep-alive connection: whole answer, or first SSE event when streaming."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    out = []
    for _ in range(CALLS):
        start = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if stream:
            response.readline()
            out.append((time.perf_counter() - start) * 1e3)
            response.read()
        else:
            response.read()
            out.append((time.perf_counter() - start) * 1e3)
        assert response.status == 200
    connection.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("prompt_ids", "stream"), [(200, False), (8000, False), (8000, True)])
def test_proxy_overhead_per_call(tmp_path: Path, prompt_ids: int, stream: bool):
    data_dir = tmp_path / "data"
    collector, grpc_address = _start(["collector", "--data", str(data_dir), "--grpc-endpoint", "127.0.0.1:0",
                                      "--http-endpoint", "", "--log-level", "INFO"], r"OTLP/gRPC (\S+),")
    try:
        with FakeVllm() as upstream:
            proxy, proxy_url = _start(["proxy", "--upstream", upstream.url, "--listen", "127.0.0.1:0",
                                       "--collector", f"http://{grpc_address}", "--log-level", "WARNING"],
                                      r"listening on (\S+)")
            try:
                # the fake answers "Echo: <prompt>" (one id per byte), cut at max_tokens: a realistic length
                messages = [{"role": "user", "content": "x" * (prompt_ids - 40)}]
                body = json.dumps({"model": "tiny-model", "messages": messages, "stream": stream,
                                   "max_tokens": 512}).encode()
                _latencies_ms(proxy_url, body, stream)  # warm up both paths
                direct = statistics.median(_latencies_ms(upstream.url, body, stream))
                proxied = statistics.median(_latencies_ms(proxy_url, body, stream))
            finally:
                _stop(proxy)  # flushes its spans
    finally:
        _stop(collector)
    rows = query(data_dir, "SELECT count(*) AS n, min(len(response_logprobs)) AS lp FROM llm_calls").to_pylist()
    assert rows == [{"n": 2 * CALLS, "lp": min(512, prompt_ids - 40 + len("Echo: ") + 1)}]
    what = "time to first SSE event" if stream else "whole call"
    print(f"\nproxy overhead, {what}, ~{prompt_ids} prompt ids + 512 response ids and logprobs, "
          f"median of {CALLS}: direct {direct:.2f} ms, through the proxy {proxied:.2f} ms, "
          f"overhead {proxied - direct:.2f} ms")
    # only a tripwire for pathologies (a quadratic stream accumulation once cost ~300 ms): shared
    # machines are noisy, the printed figure is what matters
    assert proxied - direct < 200.0
