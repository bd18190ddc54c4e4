"""`make demo`: the collector end to end, on embedded defaults.

Starts `tracetrain collector` on a fresh data directory, runs the sample agent
against it with nothing but OTEL_* variables, then queries what landed from a
separate process with `tracetrain sql`, while the collector still runs.
(The trainer, vLLM serving and the RL demo build on this in later milestones.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tracetrain-data" / "demo"
TRACETRAIN = [sys.executable, "-m", "tracetrain.collector"]


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def wait_healthy(http_port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"collector exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("collector did not become healthy in time")


def sql(query: str) -> None:
    print(f"\n$ tracetrain sql --data {DATA.relative_to(ROOT)} \"{query}\"", flush=True)
    subprocess.run([*TRACETRAIN, "sql", "--data", str(DATA), query], check=True)


def main() -> None:
    shutil.rmtree(DATA, ignore_errors=True)
    grpc_port, http_port = free_port(4317), free_port(4318)
    print(f"[1/3] tracetrain collector --data {DATA.relative_to(ROOT)} "
          f"(OTLP/gRPC 127.0.0.1:{grpc_port}, OTLP/HTTP 127.0.0.1:{http_port})", flush=True)
    collector = subprocess.Popen([*TRACETRAIN, "collector", "--data", str(DATA), "--grpc-endpoint",
                                  f"127.0.0.1:{grpc_port}", "--http-endpoint", f"127.0.0.1:{http_port}",
                                  "--log-level", "WARNING"])
    try:
        wait_healthy(http_port, collector)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{grpc_port}", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                   OTEL_SERVICE_NAME="calc-agent", OTEL_NODE_RESOURCE_DETECTORS="env,host,os,process")
        print("[2/3] sample agent, configured only by OTEL_* env vars", flush=True)
        started = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "examples" / "sample_agent.py"), "--episodes", "16"],
                       env=env, check=True)
        print(f"      exported in {time.monotonic() - started:.1f} s", flush=True)
        print("[3/3] query the store from another process while the collector runs", flush=True)
        sql("SELECT service_name, name, count(*) AS spans FROM spans GROUP BY ALL ORDER BY spans DESC")
        sql("SELECT episode_id, task_id, reward, n_llm_calls, n_spans FROM episodes ORDER BY episode_id LIMIT 5")
        sql("SELECT episode_id, model, input_tokens, output_tokens, len(response_token_ids) AS ids, "
            "round(list_avg(response_logprobs), 3) AS mean_logprob FROM llm_calls ORDER BY episode_id, start_time_unix_nano LIMIT 6")
        sql("SELECT count(*) AS episodes, avg(reward) AS success_rate FROM episodes")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            metrics = [line for line in response.read().decode().splitlines()
                       if line.startswith(("tracetrain_spans_accepted_total", "tracetrain_spans_rejected_total"))]
        print("\n/metrics:", *metrics, sep="\n  ")
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    print(f"\nDone. The spans stay in {DATA.relative_to(ROOT)}/spans (Parquet); query them again with\n"
          f"  .venv/bin/tracetrain sql --data {DATA.relative_to(ROOT)} \"SELECT * FROM llm_calls\"")


if __name__ == "__main__":
    main()
