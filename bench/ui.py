#!/usr/bin/env python3
"""Dashboard API latency on a store of about a million spans.

Writes a synthetic store straight as Parquet in the collector's layout (``spans/
date=.../service=.../compact-bench-*.parquet``, the span schema of
``tracetrain.collector.schema``; training rows under ``training/``), starts
``tracetrain collector`` on it, and times each dashboard API call over HTTP:
the episode list cold (cache build) and warm, filtered, searched, paged by
cursor, one trace, training, health; plus the uncached ``episodes`` view query
the cache replaces, and the rebuild after a new file lands.

    .venv/bin/python bench/ui.py                 # 50,000 episodes x 20 spans = 1,000,000 spans
    .venv/bin/python bench/ui.py --episodes 5000 # a quick smoke run (100k spans)

Result: bench/results/ui-<date>.json (and printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support import REPO, RESULTS_DIR, Children, free_port, http_get, log, wait_http  # noqa: E402

from tracetrain.collector import reader  # noqa: E402
from tracetrain.collector import store_layout as layout  # noqa: E402
from tracetrain.collector.schema import SPAN_SCHEMA  # noqa: E402
from tracetrain.collector.ui.store import REBUILD_BUDGET  # noqa: E402
from tracetrain.instrumentation import semconv as sc  # noqa: E402

SPANS_PER_EPISODE = 20  # root, 8 LLM calls, 10 tool calls, 1 reward
LLM_PER_EPISODE = 8
RESPONSE_TOKENS = 32
SERVICES = ("calc-agent", "price-agent", "search-agent", "code-agent")
EPISODES_PER_FILE = 2500  # 50,000 spans per file, like a compacted partition
T0_NS = 1_795_000_000 * 10**9


def _episode_table(first: int, count: int, service: str, rng: random.Random) -> pa.Table:
    """``count`` episodes of SPANS_PER_EPISODE spans each, as one Arrow table."""
    n = count * SPANS_PER_EPISODE
    cols: dict[str, list] = {f.name: [None] * n for f in SPAN_SCHEMA if not pa.types.is_list(f.type)}
    token_rows: list = [None] * n
    logprob_rows: list = [None] * n
    row = 0
    for ep in range(first, first + count):
        trace, start = f"{ep:032x}", T0_NS + ep * 2 * 10**9
        version = ep * 40 // 50_000 + 1  # 40 pushes over the whole store
        for i in range(SPANS_PER_EPISODE):
            c = cols
            c["trace_id"][row], c["span_id"][row] = trace, f"{ep:08x}{i:08x}"
            c["parent_span_id"][row] = None if i == 0 else f"{ep:08x}{0:08x}"
            c["kind"][row], c["status_code"][row], c["service_name"][row] = 1, 0, service
            c["scope_name"][row], c["attributes"][row] = "bench", "{}"
            c["start_time_unix_nano"][row] = start + i * 50_000_000
            c["end_time_unix_nano"][row] = start + (1_500_000_000 if i == 0 else i * 50_000_000 + 40_000_000)
            c["received_unix_nano"][row] = start + 2 * 10**9
            if i == 0:
                c["name"][row], c["gen_ai_operation"][row] = "invoke_agent", "invoke_agent"
                c["episode_id"][row], c["task_id"][row] = f"ep-{ep:07d}", f"task-{ep % 997}"
                c["agent_name"][row] = service.split("-")[0]
            elif i <= LLM_PER_EPISODE:
                c["name"][row], c["gen_ai_operation"][row], c["request_model"][row] = "chat tiny", "chat", "tiny"
                c["input_tokens"][row], c["output_tokens"][row] = 200, RESPONSE_TOKENS
                c["policy_version"][row] = version
                token_rows[row] = [rng.randrange(50_000) for _ in range(RESPONSE_TOKENS)]
                logprob_rows[row] = [-rng.expovariate(3.0) for _ in range(RESPONSE_TOKENS)]
            elif i < SPANS_PER_EPISODE - 1:
                c["name"][row], c["gen_ai_operation"][row] = "execute_tool calc", "execute_tool"
            else:
                c["name"][row], c["reward"][row] = "reward", float(rng.random() < 0.4 + version / 100)
            row += 1
    arrays = {**cols, "response_token_ids": token_rows, "response_logprobs": logprob_rows}
    return pa.Table.from_pydict({f.name: arrays.get(f.name, [None] * n) for f in SPAN_SCHEMA}, SPAN_SCHEMA)


def build_store(data_dir: Path, n_episodes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    reader.ensure_schema_anchor(data_dir)
    (data_dir / layout.WRITERS_DIR).mkdir(exist_ok=True)
    n_files, seq = 0, 0
    for first in range(0, n_episodes, EPISODES_PER_FILE):
        service = SERVICES[(first // EPISODES_PER_FILE) % len(SERVICES)]
        table = _episode_table(first, min(EPISODES_PER_FILE, n_episodes - first), service, rng)
        date = time.strftime("%Y-%m-%d", time.gmtime(T0_NS // 10**9 + first * 2))
        directory = layout.partition_dir(data_dir, date, service)
        directory.mkdir(parents=True, exist_ok=True)
        seq += 1
        pq.write_table(table, directory / layout.segment_file_name("compact", "bench", seq), compression="zstd")
        n_files += 1
    _training(data_dir)
    return {"episodes": n_episodes, "spans": n_episodes * SPANS_PER_EPISODE, "span_files": n_files}


def _training(data_dir: Path, steps: int = 400) -> None:
    con = duckdb.connect(":memory:")
    for table, columns, rows in ((sc.TABLE_TRAIN_STEPS, sc.TRAIN_STEP_COLUMNS, steps),
                                 (sc.TABLE_CHECKPOINTS, sc.CHECKPOINT_COLUMNS, steps // 10)):
        directory = data_dir / sc.TRAINING_DIR / table / "run=bench"
        directory.mkdir(parents=True, exist_ok=True)
        values = {"run_id": "'bench'", "step": "i", "time_unix_nano": f"{T0_NS} + i * 1000000000",
                  "policy_version": "i // 10 + 1", "loss": "1.0 / i", "kl": "0.001 * i", "clip_fraction": "0.1",
                  "reward_mean": "0.5", "success_rate": "0.5", "push_s": "0.3", "path": "'/ckpt'",
                  "episode_ids": "['ep-0000001', 'ep-0000002']", "trained_policy_versions": "[i // 10]"}
        select = ", ".join(f"CAST({values.get(name, 'NULL')} AS {kind}) AS {name}" for name, kind in columns)
        out = directory / "bench.parquet"
        con.execute(f"COPY (SELECT {select} FROM range(1, {rows + 1}) t(i)) TO '{out}' (FORMAT parquet)")
    con.close()


def timed_get(base: str, path: str, **params) -> tuple[float, dict]:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    started = time.perf_counter()
    body = http_get(f"{base}{path}" + (f"?{query}" if query else ""), timeout_s=600)
    return (time.perf_counter() - started) * 1000, json.loads(body)


def median_ms(base: str, path: str, repeat: int = 5, **params) -> float:
    return round(statistics.median(timed_get(base, path, **params)[0] for _ in range(repeat)), 1)


def measure(base: str, data_dir: Path) -> dict:
    out: dict = {}
    # The daemon starts building the episode table at start-up on a store this big; the first
    # call waits for what is left of that build.
    out["episodes_first_call_ms"], first = timed_get(base, "/ui/api/episodes", facets=1)
    out["cache_build_s"] = first["cache_build_s"]
    out["episodes_warm_ms"] = median_ms(base, "/ui/api/episodes")
    out["episodes_with_facets_ms"] = median_ms(base, "/ui/api/episodes", facets=1)
    out["episodes_filtered_ms"] = median_ms(base, "/ui/api/episodes", service="price-agent", reward_min=1,
                                            policy_version=20)
    out["episodes_search_ms"] = median_ms(base, "/ui/api/episodes", q="task-42")
    cursor, page_ms = None, []
    for _ in range(20):
        ms, page = timed_get(base, "/ui/api/episodes", cursor=cursor, limit=50)
        page_ms.append(ms)
        cursor = page["next_cursor"]
    out["episodes_next_page_median_ms"] = round(statistics.median(page_ms[1:]), 1)
    traces = [e["trace_ids"][0] for e in first["episodes"][:5]]
    trace_ms = [timed_get(base, f"/ui/api/trace/{t}")[0] for t in traces]
    out["trace_median_ms"] = round(statistics.median(trace_ms), 1)
    out["trace_max_ms"] = round(max(trace_ms), 1)
    out["training_ms"] = median_ms(base, "/ui/api/training", repeat=3)
    out["health_ms"] = median_ms(base, "/ui/api/health", repeat=3)
    # A new span file (what every commit does) makes the next list call rebuild the cache.
    extra = layout.partition_dir(data_dir, "2026-11-28", "late-agent")
    extra.mkdir(parents=True, exist_ok=True)
    pq.write_table(_episode_table(10**7, 1, "late-agent", random.Random(1)),
                   extra / layout.segment_file_name("part", "bench", 1))
    out["episodes_right_after_new_file_ms"], after = timed_get(base, "/ui/api/episodes")
    out["stale_right_after_new_file"] = after["stale"]
    # The rebuild budget (REBUILD_BUDGET) holds a costly rebuild back for a while; then the next
    # call starts it in the background and calls keep being answered from the old table.
    time.sleep(max(0.0, after["cache_build_s"] / REBUILD_BUDGET - (time.time() - after["as_of_unix_s"])) + 0.2)
    started, during_ms = time.perf_counter(), []
    while after["stale"] and time.perf_counter() - started < 300:
        ms, after = timed_get(base, "/ui/api/episodes")
        during_ms.append(ms)
        time.sleep(0.2)
    out["rebuild_in_background_s"] = time.perf_counter() - started
    out["episodes_during_rebuild_median_ms"] = round(statistics.median(during_ms), 1)
    out["new_episode_listed"] = after["episodes"][0]["episode_id"] == f"ep-{10**7:07d}"
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()}


def uncached_ms(data_dir: Path) -> dict:
    """The same page straight off the ``episodes`` view: what every request would cost without the cache."""
    con = reader.connect(data_dir)
    con.execute("SET threads = 2")
    started = time.perf_counter()
    con.execute("SELECT * FROM episodes WHERE service_name = 'price-agent' "
                "ORDER BY end_time_unix_nano DESC, episode_id DESC LIMIT 51").fetchall()
    filtered_ms = (time.perf_counter() - started) * 1000
    con.close()
    return {"episodes_view_filtered_page_ms": round(filtered_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=50_000, help="episodes of 20 spans (default 50,000)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "ui")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/ui-<date>.json)")
    args = parser.parse_args()
    if args.episodes < 100:
        parser.error("--episodes must be at least 100")
    shutil.rmtree(args.work, ignore_errors=True)
    data_dir = args.work / "data"
    log(f"writing {args.episodes * SPANS_PER_EPISODE:,} spans to {data_dir}")
    started = time.perf_counter()
    store = build_store(data_dir, args.episodes)
    store["build_s"] = round(time.perf_counter() - started, 1)
    store["bytes"] = sum(p.stat().st_size for p in data_dir.rglob("*.parquet"))
    log(f"store: {store}")
    children = Children()
    try:
        port = free_port()
        logfile = args.work / "collector.log"
        proc = children.spawn("collector", [str(REPO / ".venv" / "bin" / "tracetrain"), "collector",
                                            "--data", str(data_dir), "--grpc-endpoint", "",
                                            "--http-endpoint", f"127.0.0.1:{port}", "--compact-interval-s", "3600",
                                            "--log-level", "WARNING"], logfile=logfile)
        out_ready_s = wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc, logfile)
        api = {"collector_ready_s": round(out_ready_s, 2), **measure(f"http://127.0.0.1:{port}", data_dir)}
    finally:
        children.stop_all()
    log(f"api: {api}")
    baseline = uncached_ms(data_dir)
    log(f"uncached: {baseline}")
    result = {"bench": "ui", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": _cpus(), "platform": platform.platform(), "load_1m": _load()},
              "store": store, "api_ms": api, "uncached": baseline,
              "note": "each _ms is one HTTP request to a running `tracetrain collector` (median where repeated); "
                      "the box is shared with other work, so absolute figures are inflated"}
    out = args.out or RESULTS_DIR / f"ui-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    log(f"wrote {out}")


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0))


def _load() -> float:
    import os
    return round(os.getloadavg()[0], 2)


if __name__ == "__main__":
    main()
