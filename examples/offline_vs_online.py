"""Offline GRPO from stored spans (older policy versions included) vs the online demo run.

The main demo (examples/demo.py) trains online: each round is sampled by the policy the
trainer just pushed, so every batch is (nearly) on-policy. Its store keeps every episode
with the policy version that sampled it and the sampler's token logprobs. This script
trains **offline** from that store, from the same starting model, with the same recipe:

1. ``tracetrain train --algo grpo`` (offline: one pass over the demo's training episodes,
   ``--where "episode_id LIKE 'train-%'"``, batches of whole task groups in shuffled order)
   starting from ``WORKDIR/model`` (the warmed model; the online run's pushes went to vLLM
   and its checkpoints to ``WORKDIR/run``, the folder is not modified). Episodes sampled by
   versions 0..N are importance-corrected against their behaviour logprobs (PPO-clip
   ratio, dual clip): ``clip_fraction`` per step says how much the clip acted;
2. how off-policy the stored data is: for each band of behaviour versions, the mean
   importance ratio and the share of tokens outside the clip range 1 ± 0.2, for the
   starting model and for the offline result;
3. greedy held-out success (in process, HF ``generate``, examples/heldout_eval.py) of the
   starting model, the offline result and the online run's last checkpoint, next to the
   demo's own vLLM figures from ``summary.json``; printed and written to
   ``OUT/offline_vs_online.json``.

    python examples/offline_vs_online.py --demo tracetrain-data/demo
    python examples/offline_vs_online.py --quick --data D --model M --out O   # CI form: 2 steps, 32 tasks
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_eval import checkpoint_model, heldout_success, write_json

ROOT = Path(__file__).resolve().parents[1]
TT = [sys.executable, "-m", "tracetrain.collector"]  # the `tracetrain` CLI of this interpreter
CLIP_EPS = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", help="work folder of a finished demo run (data/, model/, run/, summary.json)")
    parser.add_argument("--data", help="store to train from (default DEMO/data)")
    parser.add_argument("--model", help="starting model (default DEMO/model)")
    parser.add_argument("--out", help="output folder (default DEMO/offline)")
    parser.add_argument("--where", default="episode_id LIKE 'train-%'", help="SQL over episodes: what to train on")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-episodes", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default: one pass)")
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--version-bands", type=int, default=4, help="behaviour-version bands in the ratio table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI form: 2 steps, 32 held-out tasks")
    args = parser.parse_args(argv)
    demo = Path(args.demo).resolve() if args.demo else None
    if demo is None and not (args.data and args.model and args.out):
        parser.error("give --demo DIR, or --data, --model and --out")
    args.data = Path(args.data or demo / "data").resolve()
    args.model = Path(args.model or demo / "model").resolve()
    args.out = Path(args.out or demo / "offline").resolve()
    args.demo = demo
    if args.quick:
        args.max_steps, args.heldout, args.batch_episodes = args.max_steps or 2, 32, min(args.batch_episodes, 64)
    return args


def train_offline(args: argparse.Namespace) -> tuple[str, float]:
    run_id = f"offline-{int(time.time())}"
    command = [*TT, "train", "--algo", "grpo", "--offline", "--data", str(args.data), "--model", str(args.model),
               "--where", args.where, "--group-size", str(args.group_size), "--batch-episodes",
               str(args.batch_episodes), "--lr", str(args.lr), "--adam-beta2", "0.99", "--minibatches", "2",
               "--run-id", run_id, "--out", str(args.out / "run"), "--threads", str(args.threads), "--seed", "0",
               "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    print("$ tracetrain " + " ".join(command[3:]), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    return run_id, time.monotonic() - started


def run_figures(data: Path, run_id: str) -> dict:
    """Per-run aggregates from train_steps and the behaviour versions trained on (checkpoints)."""
    from tracetrain.trainer import store

    con = store.connect(data)
    try:
        row = con.execute("SELECT count(*), avg(clip_fraction), max(clip_fraction), avg(staleness_mean), "
                          "max(staleness_mean), avg(reward_mean), sum(step_s) FROM train_steps WHERE run_id = ?",
                          [run_id]).fetchone()
        versions = con.execute("SELECT list_distinct(flatten(list(trained_policy_versions))) FROM checkpoints "
                               "WHERE run_id = ?", [run_id]).fetchone()[0]
    finally:
        con.close()
    keys = ("steps", "clip_fraction_mean", "clip_fraction_max", "staleness_mean", "staleness_max",
            "batch_reward_mean", "train_s")
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in zip(keys, row)}
    figures["behaviour_versions"] = sorted(versions or [])
    return figures


def ratio_by_version(model_dir: Path, data: Path, where: str, bands: int, rows_per_band: int = 64) -> list[dict]:
    """Importance ratio exp(logp_model - logp_behaviour) of stored tokens, by band of behaviour version."""
    import numpy as np
    import torch
    from tracetrain.trainer import store, transitions
    from tracetrain.trainer.batch import to_batch
    from tracetrain.trainer.policy import load_policy, token_logprobs

    con = store.connect(data)
    try:
        rows, _ = transitions.build_transitions(transitions.load_calls(con, where=where))
    finally:
        con.close()
    versions = rows["policy_version"].to_numpy(zero_copy_only=False).astype(float)
    lo, hi = np.nanmin(versions), np.nanmax(versions)
    edges = np.linspace(lo, hi + 1, bands + 1) if hi > lo else np.array([lo, hi + 1])
    policy = load_policy(model_dir)
    table = []
    for a, b in itertools.pairwise(edges):
        picked = np.flatnonzero((versions >= a) & (versions < b))[:rows_per_band]
        if not len(picked):
            continue
        batch = to_batch(rows.take(picked), policy.pad_token_id)
        with torch.no_grad():
            new = token_logprobs(policy.activate(None), batch)  # [B, T]
        mask = batch.response_mask.bool() & ~torch.isnan(batch.old_logprobs)
        ratio = torch.exp(new - batch.old_logprobs)[mask]
        table.append({"versions": f"{int(np.ceil(a))}..{int(np.ceil(b)) - 1}", "rows": len(picked),
                      "ratio_mean": round(float(ratio.mean()), 4),
                      "outside_clip": round(float(((ratio - 1).abs() > CLIP_EPS).float().mean()), 4)})
    return table


def online_figures(demo: Path | None, n: int) -> dict | None:
    """The demo's own summary (vLLM held-out success) and its last checkpoint evaluated here."""
    if demo is None or not (demo / "summary.json").exists():
        return None
    summary = json.loads((demo / "summary.json").read_text())
    last = checkpoint_model(demo / "run")
    return {"summary_success_before_vllm": summary["success_before"], "summary_success_after_vllm":
            summary["success_after"], "steps": summary["steps"], "wall_s": summary["wall_s"],
            "checkpoint": str(last), "heldout": heldout_success(last, n)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = heldout_success(args.model, args.heldout)
    ratios_start = ratio_by_version(args.model, args.data, args.where, args.version_bands)
    run_id, train_s = train_offline(args)
    trained = checkpoint_model(args.out / "run")
    offline = {"run_id": run_id, "checkpoint": str(trained), "train_wall_s": round(train_s, 1),
               **run_figures(args.data, run_id), "heldout": heldout_success(trained, args.heldout),
               "ratio_by_version_at_end": ratio_by_version(trained, args.data, args.where, args.version_bands)}
    online = online_figures(args.demo, args.heldout)
    if online is not None:
        online.update({f"online_{k}": v for k, v in run_figures(args.data, "demo").items()
                       if k in ("clip_fraction_mean", "staleness_mean", "behaviour_versions")})
    result = {"data": str(args.data), "model": str(args.model), "where": args.where, "heldout_tasks": args.heldout,
              "start": start, "ratio_by_version_at_start": ratios_start, "offline": offline, "online": online,
              "quick": args.quick}
    print(f"\n  held-out success ({args.heldout} tasks, greedy, HF in process)")
    print(f"    starting model           {100 * start['all']:6.1f}%")
    print(f"    offline GRPO, {offline['steps']:3d} steps   {100 * offline['heldout']['all']:6.1f}%   "
          f"(clip fraction {offline['clip_fraction_mean']}, behaviour versions "
          f"{offline['behaviour_versions'][:1]}..{offline['behaviour_versions'][-1:]})")
    if online:
        print(f"    online GRPO, {online['steps']:3d} steps    {100 * online['heldout']['all']:6.1f}%   "
              f"(vLLM: {100 * online['summary_success_after_vllm']:.1f}%, clip fraction "
              f"{online.get('online_clip_fraction_mean')}, staleness {online.get('online_staleness_mean')})")
    print("  importance ratio of stored tokens by behaviour version (start -> offline result):")
    for s, e in zip(ratios_start, offline["ratio_by_version_at_end"]):
        print(f"    v{s['versions']:>9}  ratio {s['ratio_mean']:.3f} -> {e['ratio_mean']:.3f}   "
              f"outside 1±{CLIP_EPS}: {s['outside_clip']:.3f} -> {e['outside_clip']:.3f}")
    write_json(args.out / "offline_vs_online.json", result)
    return result


if __name__ == "__main__":
    main()
