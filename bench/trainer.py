#!/usr/bin/env python3
"""Trainer benchmark: the loop's overhead beyond the model's work, and update-to-serving latency.

1. **Overhead.** A real collector (in process) holds N batches of tool-task-sized episodes
   (P16 x G8 = 128 episodes per step, two calls merged into one ~56-token sequence each, the
   shape of shared/notes/rl-feasibility.md). ``train --online`` (full fine-tuning, tiny model)
   trains them one batch per step. For steps 2..N the wall time between step ends (store poll,
   transitions, advantages, batching, updates, checkpoint, train_steps rows) is set against the
   forward/backward/optimizer time (``update_s``) of those steps:
   ``overhead = 1 - sum(update_s) / wall``. Target: < 10 %.
2. **Update-to-serving latency**, against the real vLLM (.venv-serve): for each step, from the end
   of its optimizer updates to the first client answer carrying the new
   ``x-tracetrain-policy-version`` (a poller asks every 20 ms), for LoRA and full pushes;
   split into checkpoint write and push.

Writes bench/results/trainer-<UTC date>[-quick].json.

    .venv/bin/python bench/trainer.py            # 8 steps per run
    .venv/bin/python bench/trainer.py --quick    # 4 steps, a smoke check
    .venv/bin/python bench/trainer.py --no-serve # overhead only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.* helpers: the in-process collector and OTLP episode export

from tests.conftest import make_collector  # noqa: E402
from tests.integration.rl_episodes import Call, Episode, export_episodes  # noqa: E402
from tracetrain.trainer import model_init, serving  # noqa: E402
from tracetrain.trainer.train_config import TrainConfig  # noqa: E402
from tracetrain.trainer.train_loop import train  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
WORK_DIR = REPO / "bench" / "work" / "trainer"
TASKS, GROUP = 16, 8


def episodes(prefix: str, seed: int) -> list[Episode]:
    """One step's batch: 16 tasks x 8 episodes, 2 calls (24 + 14 | +8 tool + 10 tokens), rewards 0/1."""
    rng = random.Random(seed)
    out = []
    for t in range(TASKS):
        for g in range(GROUP):
            p1 = [rng.randrange(10, 300) for _ in range(24)]
            r1 = [rng.randrange(10, 300) for _ in range(14)]
            p2 = p1 + r1 + [rng.randrange(10, 300) for _ in range(8)]
            r2 = [rng.randrange(10, 300) for _ in range(10)]
            ep = Episode(f"{prefix}-{t}-{g}", f"{prefix}-task-{t}", "", reward=float(rng.random() < 0.4))
            ep.calls = [Call(p1, r1, [-6.2] * len(r1)), Call(p2, r2, [-6.2] * len(r2))]
            out.append(ep)
    return out


def fill_store(data: Path, steps: int, version: int = 0) -> None:
    collector = make_collector(data)
    try:
        t0 = time.time_ns()
        for s in range(steps):
            export_episodes(collector.grpc_port, episodes(f"s{s}", s), t0 + s * 10**9, policy_version=version,
                            first_index=s * TASKS * GROUP)
    finally:
        collector.stop()


def run_online(model: Path, data: Path, out: Path, steps: int, **kw) -> list[dict]:
    cfg = TrainConfig(data_dir=str(data), model_dir=str(model), online=True, group_size=GROUP,
                      batch_episodes=TASKS * GROUP, max_steps=steps, poll_interval_s=0.05, run_id=out.name,
                      out_dir=str(out), threads=kw.pop("threads", 1), **kw)
    report = train(cfg, progress=False)
    assert report.steps_done == steps, report
    return report.rows


def overhead(model: Path, steps: int, checkpoint_every: int = 1) -> dict:
    data = WORK_DIR / "overhead-data"
    if not data.exists():
        fill_store(data, steps)
    out = WORK_DIR / f"overhead-run-{checkpoint_every}"
    rows = run_online(model, data, out, steps, checkpoint_every=checkpoint_every)
    t = [r["timing"] for r in rows]
    ends = [x["pushed_unix_nano"] for x in t]
    wall_s = (ends[-1] - ends[0]) / 1e9
    update_s = sum(x["update_s"] for x in t[1:])
    per_step = [x["step_s"] for x in t[1:]]
    return {"checkpoint_every": checkpoint_every, "steps": steps, "episodes_per_step": TASKS * GROUP, "tokens_per_step": rows[0]["n_tokens"],
            "wall_s_steps_2_to_n": round(wall_s, 3), "update_s_steps_2_to_n": round(update_s, 3),
            "overhead_fraction": round(1 - update_s / wall_s, 4),
            "in_step_overhead_fraction": round(1 - update_s / sum(per_step), 4),
            "step_s_median": round(statistics.median(per_step), 4),
            "update_s_median": round(statistics.median(x["update_s"] for x in t[1:]), 4),
            "checkpoint_s_median": round(statistics.median(
                (x["checkpoint_end_unix_nano"] - x["update_end_unix_nano"]) / 1e9 for x in t[1:]), 4)}


def _poll_versions(url: str, model: str, seen: dict[int, int], stop: threading.Event) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "2+3?"}], "max_tokens": 1}
    while not stop.is_set():
        try:
            status, _, headers = serving.http_json(url + "/v1/chat/completions", body, timeout=30)
            v = {k.lower(): x for k, x in headers.items()}.get("x-tracetrain-policy-version")
            if status == 200 and v is not None:
                seen.setdefault(int(v), time.time_ns())
        except OSError:
            pass
        stop.wait(0.02)


def latency(model: Path, steps: int, lora: bool, server: serving.ServerHandle) -> dict:
    name = "lora" if lora else "full"
    data = WORK_DIR / f"latency-{name}-data"
    v0 = json.loads(Path(server.state_file).read_text())["version"]
    fill_store(data, steps, version=v0)
    seen: dict[int, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_versions, args=(server.url, "policy" if lora else server.served_name,
                                                           seen, stop), daemon=True)
    poller.start()
    try:
        rows = run_online(model, data, WORK_DIR / f"latency-{name}-run", steps, lora=lora, serve_url=server.url,
                          serve_state_file=server.state_file)
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join(30)
    lat, ckpt, push = [], [], []
    for r in rows:
        t = r["timing"]
        if r["policy_version"] in seen:
            lat.append((seen[r["policy_version"]] - t["update_end_unix_nano"]) / 1e9)
        ckpt.append((t["checkpoint_end_unix_nano"] - t["update_end_unix_nano"]) / 1e9)
        push.append(t["push_s"])
    return {"kind": name, "steps": steps, "versions_seen": len(lat),
            "update_to_serving_s_median": round(statistics.median(lat), 3) if lat else None,
            "update_to_serving_s_max": round(max(lat), 3) if lat else None,
            "checkpoint_s_median": round(statistics.median(ckpt), 3), "push_s_median": round(statistics.median(push), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-serve", action="store_true", help="skip the vLLM latency part")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = 4 if args.quick else 8
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    model = model_init.init_model(WORK_DIR / "tiny", size="tiny", seed=0)
    result = {"benchmark": "trainer", "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_1m": os.getloadavg()[0]},
              "model": "tiny (model init, 0.36M params), full fine-tuning, 1 torch thread",
              "overhead": overhead(model, steps), "overhead_checkpoint_every_4": overhead(model, steps, 4)}
    print(json.dumps(result["overhead"]), json.dumps(result["overhead_checkpoint_every_4"]), flush=True)
    if not args.no_serve:
        try:
            serving.serve_python()
        except serving.ServeEnvMissing as exc:
            result["latency"] = f"skipped: {exc}"
        else:
            from bench.bench_support import free_port
            server = serving.start_server(model, free_port(), log_path=str(WORK_DIR / "vllm.log"), timeout=600)
            try:
                result["latency"] = [latency(model, min(steps, 4), True, server),
                                     latency(model, min(steps, 4), False, server)]
            finally:
                server.stop()
            print(json.dumps(result["latency"]), flush=True)
    result["machine"]["load_1m_end"] = os.getloadavg()[0]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    path = RESULTS_DIR / f"trainer-{day}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
