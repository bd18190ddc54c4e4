"""SFT from the best stored episodes: `tracetrain train --algo sft --where "reward >= 1"`.

The store holds the tool agent's (examples/tool_agent.py) sampled episodes with their
rewards. Supervised fine-tuning on the rewarded ones only (rejection sampling / best-of-n
distillation) is the simplest thing to train from traces:

1. the store: ``--data DIR`` reuses one (the main demo's ``WORKDIR/data``, with ``--model
   WORKDIR/model``, the warmed model that sampled it); without it, this script builds one the
   demo's way (``tracetrain model init`` + ``warmup``, ``tracetrain collector``, ``tracetrain
   serve`` (vLLM), ``tracetrain rollout`` of the agent at T=1 on training tasks);
2. ``tracetrain train --algo sft --where "reward >= 1 AND episode_id NOT LIKE 'eval-%'"``
   offline, full fine-tuning (the demo's held-out evaluation episodes are never trained on);
3. before/after: greedy success on the demo's held-out tasks (in process, HF ``generate``,
   examples/heldout_eval.py) and the mean log-probability of the selected responses;
   printed and written to ``WORKDIR/sft_summary.json``.

    python examples/sft_from_best.py --data tracetrain-data/demo/data --model tracetrain-data/demo/model
    python examples/sft_from_best.py --workdir /tmp/sft            # builds its own store (vLLM)
    python examples/sft_from_best.py --quick --data D --model M    # CI form: 8 steps, 32 held-out tasks
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_eval import checkpoint_model, heldout_success, response_logprob, write_json

ROOT = Path(__file__).resolve().parents[1]
TT = [sys.executable, "-m", "tracetrain.collector"]  # the `tracetrain` CLI of this interpreter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="store with rewarded tool-agent episodes (none: build one with vLLM)")
    parser.add_argument("--model", help="the model that sampled them (required with --data)")
    parser.add_argument("--workdir", default=str(ROOT / "tracetrain-data" / "sft"), help="output folder")
    # the demo's held-out evaluation episodes (eval-*) share the store: never train on them
    parser.add_argument("--where", default="reward >= 1 AND episode_id NOT LIKE 'eval-%'",
                        help="SQL over episodes: the ones to imitate")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-episodes", type=int, default=64)
    parser.add_argument("--data-epochs", type=int, default=1, help="passes over the selected episodes")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default: the passes)")
    parser.add_argument("--heldout", type=int, default=256, help="held-out tasks (greedy)")
    parser.add_argument("--sample-tasks", type=int, default=512, help="without --data: training tasks sampled")
    parser.add_argument("--group-size", type=int, default=4, help="without --data: samples per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI form: 8 steps of 32 episodes (4 passes at most), 32 held-out tasks")
    args = parser.parse_args(argv)
    if args.data and not args.model:
        parser.error("--data needs --model (the model folder that sampled the episodes)")
    if args.quick:
        args.batch_episodes, args.max_steps, args.data_epochs = 32, 8, 4
        args.heldout, args.sample_tasks = 32, 32
    return args


def build_store(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The demo's stages up to sampling (examples/demo.py), with no trainer: returns (data, model)."""
    from demo import AGENT, GRADER, Demo
    from demo import parse_args as demo_args

    demo = Demo(demo_args(["--workdir", str(work / "sample"), "--heldout", str(args.heldout), "--rounds", "1",
                           "--tasks-per-round", str(args.sample_tasks)]))
    try:
        demo.prepare()
        demo.start_services()
        demo.run("rollout_s", [*TT, "rollout", "--tasks", str(demo.tasks / "train.jsonl"), "--agent", AGENT,
                               "--grader", GRADER, "-G", str(args.group_size), "-C", "64", "--run-id", "sample",
                               "--collector", f"http://127.0.0.1:{demo.grpc_port}", "--service-name", "tool-agent",
                               "--agent-name", "tool_agent", "--failure-reward", "0", "--quiet"],
                 env={**demo.env, "TOOL_AGENT_TEMPERATURE": "1.0"})
    finally:
        demo.stop_all()
    return demo.data, demo.model


def count_selected(data: Path, where: str) -> tuple[int, int]:
    """(episodes selected by ``where``, episodes in the store)."""
    from tracetrain.trainer import store

    con = store.connect(data)
    try:
        total = con.execute("SELECT count(*) FROM episodes").fetchone()[0]
        selected = con.execute(f"SELECT count(*) FROM episodes WHERE {where}").fetchone()[0]
    finally:
        con.close()
    return selected, total


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data, model = (Path(args.data).resolve(), Path(args.model).resolve()) if args.data else build_store(args, work)
    selected, total = count_selected(data, args.where)
    print(f"store {data}: {selected} of {total} episodes match {args.where!r}", flush=True)
    before = {"heldout": heldout_success(model, args.heldout), "logprob": response_logprob(model, data, args.where)}
    run_id = f"sft-{int(time.time())}"
    out = work / "run"
    command = [*TT, "train", "--algo", "sft", "--data", str(data), "--model", str(model), "--where", args.where,
               "--lr", str(args.lr), "--batch-episodes", str(args.batch_episodes), "--data-epochs",
               str(args.data_epochs), "--run-id", run_id, "--out", str(out), "--threads", str(args.threads),
               "--checkpoint-every", "1000000", "--seed", "0"]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    print("$ tracetrain " + " ".join(command[3:]), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    train_s = time.monotonic() - started
    trained = checkpoint_model(out)
    after = {"heldout": heldout_success(trained, args.heldout), "logprob": response_logprob(trained, data, args.where)}
    summary = {"data": str(data), "model": str(model), "where": args.where, "episodes_selected": selected,
               "episodes_in_store": total, "run_id": run_id, "checkpoint": str(trained), "heldout_tasks": args.heldout,
               "success_before": before["heldout"], "success_after": after["heldout"],
               "selected_response_logprob_before": before["logprob"],
               "selected_response_logprob_after": after["logprob"],
               "train_s": round(train_s, 1), "wall_s": round(time.monotonic() - t0, 1), "quick": args.quick}
    print(f"\n                         before    after   (SFT on {selected} episodes with {args.where})")
    print(f"  held-out success      {100 * before['heldout']['all']:6.1f}%  {100 * after['heldout']['all']:6.1f}%")
    print(f"  logprob/token (best)  {before['logprob']:7.3f}  {after['logprob']:7.3f}")
    write_json(work / "sft_summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
