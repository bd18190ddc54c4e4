#!/usr/bin/env python3
"""Transition-building benchmark: span store -> transitions -> advantages -> padded batches.

Generates a store of LLM-call spans directly as Parquet, in the collector's own layout and
with its own writer code (schema, encoding, file names, views.sql), then times, on that store:

  load      transitions.load_calls (DuckDB over the llm_calls and episodes views -> Arrow)
  build     transitions.build_transitions (rewards, filters, multi-turn merge)
  advantage advantages.grpo
  batch     batch.to_batch over the whole table in mini-batches of --batch-rows rows

Each episode: 4 calls by 2 agents; each agent's second call extends its first one (prompt =
first prompt + response + a tool turn), so the merge has work to do. Token figures count
every prompt and response id of every call ("call tokens"), the work the trainer must read.

Writes bench/results/transitions-<UTC date>[-quick].json; the store goes to
bench/work/transitions/ (git-ignored, rebuilt each run).

    .venv/bin/python bench/transitions.py               # 100k LLM-call spans, median of 3 runs
    .venv/bin/python bench/transitions.py --quick       # 10k spans, a smoke check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tracetrain.collector import store_layout as layout
from tracetrain.collector.reader import write_views_file
from tracetrain.collector.schema import SPAN_SCHEMA
from tracetrain.collector.segment_io import write_parquet
from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import advantages, batch, store, transitions

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
WORK_DIR = REPO / "bench" / "work" / "transitions"
CALLS_PER_EPISODE = 4
ROLLOUTS_PER_TASK = 8
T0_NS = 1_767_225_600_000_000_000


def _episode_calls(rng: np.random.Generator, vocab: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(agent index, prompt ids, response ids) of one episode's 4 calls, in call order."""
    calls = []
    for agent in (0, 1):
        prompt = rng.integers(3, vocab, int(rng.integers(60, 120)))
        response = rng.integers(3, vocab, int(rng.integers(20, 60)))
        tool = rng.integers(3, vocab, int(rng.integers(10, 30)))
        calls.append((agent, prompt, response))
        second = rng.integers(3, vocab, int(rng.integers(20, 60)))
        calls.append((agent, np.concatenate([prompt, response, tool]), second))
    return [calls[0], calls[2], calls[1], calls[3]]  # planner, coder, planner, coder


def _list_column(arrays: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """A list column from NumPy arrays, NULL where the entry is None (as the collector stores it)."""
    lengths = np.array([0 if a is None else len(a) for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([a for a in arrays if a is not None])
    missing = pa.array(np.array([a is None for a in arrays]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type), mask=missing)


def _span_table(rows: dict[str, list], lists: dict[str, list]) -> pa.Table:
    columns = []
    for field in SPAN_SCHEMA:
        if field.name in lists:
            columns.append(_list_column(lists[field.name], field.type.value_type))
        elif field.name in rows:
            columns.append(pa.array(rows[field.name], field.type))
        else:
            columns.append(pa.nulls(len(rows[sc.COL_SPAN_ID]), field.type))
    return pa.Table.from_arrays(columns, schema=SPAN_SCHEMA)


def generate_store(data_dir: Path, n_calls: int, seed: int = 0, file_calls: int = 10_000) -> dict[str, int]:
    """Write ``n_calls`` LLM-call spans (plus one reward span per episode) as collector Parquet."""
    layout.ensure_store(data_dir)
    write_views_file(data_dir)
    directory = layout.partition_dir(data_dir, "2026-01-01", "bench-agent")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_episodes = n_calls // CALLS_PER_EPISODE
    per_file = max(1, file_calls // CALLS_PER_EPISODE)
    totals = {"llm_call_spans": 0, "reward_spans": 0, "call_tokens": 0, "files": 0}
    for first in range(0, n_episodes, per_file):
        rows: dict[str, list] = {k: [] for k in (sc.COL_TRACE_ID, sc.COL_SPAN_ID, sc.COL_NAME, sc.COL_KIND,
                                                  sc.COL_START_NS, sc.COL_END_NS, sc.COL_SERVICE_NAME,
                                                  sc.COL_OPERATION, sc.COL_POLICY_VERSION, sc.COL_EPISODE_ID,
                                                  sc.COL_TASK_ID, sc.COL_ROLLOUT_ID, sc.COL_AGENT_NAME,
                                                  sc.COL_REWARD, sc.COL_RECEIVED_NS)}
        lists: dict[str, list] = {sc.COL_PROMPT_TOKEN_IDS: [], sc.COL_RESPONSE_TOKEN_IDS: [],
                                  sc.COL_RESPONSE_LOGPROBS: []}
        for e in range(first, min(first + per_file, n_episodes)):
            trace, start = f"{e + 1:032x}", T0_NS + e * 10**9
            for i, (agent, prompt, response) in enumerate(_episode_calls(rng, 32_000)):
                values = (trace, f"{(e << 4) + i + 1:016x}", "chat bench", 3, start + i * 10**7,
                          start + i * 10**7 + 10**6, "bench-agent", "chat", 7, f"ep-{e}",
                          f"task-{e // ROLLOUTS_PER_TASK}",
                          f"r-{e % ROLLOUTS_PER_TASK}", ("planner", "coder")[agent], None, start)
                for key, value in zip(rows, values):
                    rows[key].append(value)
                for key, value in zip(lists, (prompt, response, -rng.random(len(response)))):
                    lists[key].append(value)
                totals["call_tokens"] += len(prompt) + len(response)
            values = (trace, f"{(e << 4):016x}", "reward", 1, start + 10**8, start + 10**8, "bench-agent", None, None,
                      f"ep-{e}", None, None, None, float(rng.integers(0, 2)), start)
            for key, value in zip(rows, values):
                rows[key].append(value)
            for key in lists:  # a reward span has no id lists
                lists[key].append(None)
        n = len(rows[sc.COL_SPAN_ID])
        table = _span_table(rows, lists)
        write_parquet(table, directory / layout.segment_file_name("part", "bench", totals["files"] + 1),
                      {sc.PARQUET_SCHEMA_VERSION_KEY: str(sc.SCHEMA_VERSION)})
        totals["files"] += 1
        totals["llm_call_spans"] += n - (min(first + per_file, n_episodes) - first)
        totals["reward_spans"] += min(first + per_file, n_episodes) - first
    return totals


def run_once(data_dir: Path, batch_rows: int) -> dict[str, float]:
    import torch  # noqa: F401 - the trainer has torch loaded already; its import is not ours to time

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    con = store.connect(data_dir)
    calls = transitions.load_calls(con)
    con.close()
    timings["load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    table, skipped = transitions.build_transitions(calls, transitions.TransitionConfig(max_len=4096))
    timings["build_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    scored, dropped = advantages.grpo(table)
    timings["advantage_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    n_batches = 0
    for start in range(0, scored.num_rows, batch_rows):
        batch.to_batch(scored.slice(start, batch_rows), pad_token_id=0)
        n_batches += 1
    timings["batch_s"] = time.perf_counter() - clock
    timings["total_s"] = sum(timings.values())
    saving = transitions.merge_saving(table)
    timings.update(calls=calls.num_rows, rows=table.num_rows, rows_after_grpo=scored.num_rows, batches=n_batches,
                   skipped=dict(skipped + dropped), **saving)
    return timings


def machine() -> dict[str, object]:
    import duckdb

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False, timeout=10).stdout.strip()
    except OSError:
        commit = None
    return {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "pyarrow": pa.__version__, "numpy": np.__version__, "duckdb": duckdb.__version__, "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=100_000, help="LLM-call spans to generate (default 100000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default 3)")
    parser.add_argument("--batch-rows", type=int, default=64, help="rows per to_batch call (default 64)")
    parser.add_argument("--quick", action="store_true", help="10k spans, 1 run: a smoke check, not figures")
    args = parser.parse_args()
    spans, runs = (10_000, 1) if args.quick else (args.spans, args.runs)
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    data_dir = WORK_DIR / "data"
    load_before = os.getloadavg()
    clock = time.perf_counter()
    store_totals = generate_store(data_dir, spans)
    generate_s = time.perf_counter() - clock
    print(f"store: {store_totals} in {generate_s:.1f} s", flush=True)
    results = []
    for i in range(runs):
        results.append(run_once(data_dir, args.batch_rows))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1].items() if k.endswith("_s")),
              flush=True)
    median = {k: statistics.median(r[k] for r in results) for k in results[0] if k.endswith("_s")}
    tokens = store_totals["call_tokens"]
    summary = {
        "call_tokens": tokens,
        "tokens_per_s": tokens / median["total_s"],
        "tokens_per_s_without_load": tokens / (median["total_s"] - median["load_s"]),
        "median_s": median,
        "tokens_forwarded": results[0]["tokens_forwarded"],
        "tokens_forwarded_unmerged": results[0]["tokens_forwarded_unmerged"],
        "merge_saving": results[0]["saving"],
    }
    now = dt.datetime.now(dt.UTC)
    out = {"bench": "transitions", "mode": "quick" if args.quick else "full", "time_utc": now.isoformat(),
           "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
           "store": store_totals, "generate_s": generate_s, "batch_rows": args.batch_rows, "runs": results,
           "summary": summary}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"transitions-{now:%Y-%m-%d}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{tokens:,} call tokens in {median['total_s']:.2f} s (median of {runs}): "
          f"{summary['tokens_per_s'] / 1e6:.2f} M tokens/s end to end, "
          f"{summary['tokens_per_s_without_load'] / 1e6:.2f} M tokens/s after the DuckDB load; "
          f"merge forwards {summary['tokens_forwarded']:,} instead of {summary['tokens_forwarded_unmerged']:,} "
          f"tokens ({100 * summary['merge_saving']:.1f} % fewer) -> {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
