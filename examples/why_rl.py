"""`make demo-why-rl`: few demonstrations, then more SFT on them or GRPO with just a verifier (one plot).

The case for RL on this task (shared/notes/rl-feasibility.md, variant B), run with tracetrain's
own commands:

1. `tracetrain model init`, then `tracetrain model warmup --demos 80 --steps 300`: the tiny
   model learns the tool format from 80 demonstrations, under a third of the demo's 256
   (with 64 or fewer it learns nothing that transfers, ~1% held-out; with 96 or more SFT
   alone goes past 75%), the common start of both arms;
2. SFT arm: `tracetrain model warmup --demos 80` goes on training on the same demos,
   keeping a model folder every `--sft-save-every` steps;
3. GRPO arm: the demo's loop (examples/demo.py with `--start-model`): `tracetrain collector`,
   `tracetrain serve`, `tracetrain rollout --rounds --await-policy` of the unchanged agent on
   fresh tasks graded only by exact match, `tracetrain train --online --algo grpo`, a
   checkpoint every `--grpo-checkpoint-every` steps;
4. every model folder of both arms is scored the same way: greedy multi-turn success on the
   demo's held-out tasks (examples/heldout_eval.py, the same numbers vLLM gives);
5. `why_rl.png` (both curves on one plot) and `why_rl.json` in the work folder.

``--quick`` is the form CI runs (a few steps per arm, 32 held-out tasks): it checks that both
arms train and are scored, not that the curves separate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402 - the GRPO arm is the demo's loop
from heldout_eval import heldout_success  # noqa: E402

TT = demo.TT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "tracetrain-data" / "why-rl"), help="fresh folder")
    parser.add_argument("--demos", type=int, default=80, help="demonstrations both arms get")
    parser.add_argument("--start-steps", type=int, default=300, help="SFT steps of the common start")
    parser.add_argument("--sft-steps", type=int, default=1200, help="further SFT steps (SFT arm)")
    parser.add_argument("--sft-save-every", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=100, help="GRPO steps (GRPO arm)")
    parser.add_argument("--grpo-lr", type=float, default=2e-4, help="GRPO learning rate (the demo's)")
    parser.add_argument("--grpo-checkpoint-every", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=256, help="held-out tasks scored per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="CI form: a 100-step start, then 20 SFT and 4 GRPO steps, 32 held-out tasks")
    args = parser.parse_args(argv)
    if args.quick:
        args.start_steps, args.sft_steps, args.sft_save_every = 100, 20, 10
        args.rounds, args.grpo_checkpoint_every, args.heldout = 4, 2, 32
    return args


def run(command: list[str]) -> None:
    print("$ " + " ".join(["tracetrain", *command[3:]] if command[:3] == TT else command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **demo.OFFLINE_ENV})


def steps_of(folder: Path) -> list[tuple[int, Path]]:
    """``(step, model folder)`` of ``folder/step-N`` (SFT) or ``folder/step-N/model`` (trainer)."""
    found = []
    for path in folder.glob("step-*"):
        if path.name.removeprefix("step-").isdigit():
            found.append((int(path.name.removeprefix("step-")), path / "model" if (path / "model").is_dir() else path))
    return sorted(found)


def score(label: str, models: list[tuple[int, Path]], n: int) -> list[dict]:
    points = []
    for step, folder in models:
        success = heldout_success(folder, n)
        points.append({"step": step, "success": success["all"], "by_kind": success})
        print(f"{label} step {step}: held-out success {100 * success['all']:.1f}%", flush=True)
    return points


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = result["start"]["success"]
    for key, color, label in (("sft", "#357", f"SFT, more passes over the same {result['demos']} demonstrations"),
                              ("grpo", "#c33", f"GRPO, fresh tasks, {result['grpo_grader']} only (served by vLLM)")):
        xs = [0] + [p["step"] for p in result[key]]
        ys = [start] + [p["success"] for p in result[key]]
        ax.plot(xs, ys, "o-", color=color, lw=2, label=label)
    ax.set_xlabel("training step after the common start (SFT: batch of 32 demos; GRPO: 16 tasks x 8 samples)")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_ylim(0, max(0.6, max(p["success"] for p in result["sft"] + result["grpo"]) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(f"Why RL: {result['demos']} demonstrations, then SFT vs GRPO with a verifier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    demo.shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    seed = str(args.seed)
    run([*TT, "model", "init", "--out", str(work / "base"), "--seed", seed])
    run([*TT, "model", "warmup", "--model", str(work / "base"), "--task", "tools", "--seed", seed,
         "--demos", str(args.demos), "--steps", str(args.start_steps), "--out", str(work / "start")])
    started = time.monotonic()
    run([*TT, "model", "warmup", "--model", str(work / "start"), "--task", "tools", "--seed", seed,
         "--demos", str(args.demos), "--steps", str(args.sft_steps), "--save-every", str(args.sft_save_every),
         "--checkpoints", str(work / "sft"), "--out", str(work / "sft-final")])
    sft_s = time.monotonic() - started
    started = time.monotonic()
    grpo_argv = ["--workdir", str(work / "grpo"), "--start-model", str(work / "start"), "--rounds", str(args.rounds),
                 "--eval-every", str(args.rounds), "--checkpoint-every", str(args.grpo_checkpoint_every),
                 "--keep-checkpoints", "1000", "--heldout", str(args.heldout), "--seed", seed,
                 "--lr", str(args.grpo_lr)]
    if args.quick:
        grpo_argv += ["--tasks-per-round", "8", "--group-size", "4", "--concurrency", "32", "--partial-credit"]
    if demo.main(grpo_argv) != 0:
        raise SystemExit("the GRPO arm did not close its loop; see " + str(work / "grpo"))
    grpo_s = time.monotonic() - started
    grpo_summary = json.loads((work / "grpo" / "summary.json").read_text())
    result = {"demos": args.demos, "start_steps": args.start_steps, "heldout": args.heldout, "seed": args.seed,
              "start": score("start", [(0, work / "start")], args.heldout)[0],
              "sft": score("SFT", steps_of(work / "sft"), args.heldout),
              "grpo": score("GRPO", steps_of(work / "grpo" / "run"), args.heldout),
              "grpo_vllm_evals": grpo_summary["evals"], "sft_s": round(sft_s, 1), "grpo_s": round(grpo_s, 1),
              "wall_s": round(time.monotonic() - t0, 1), "quick": args.quick,
              "grpo_grader": "partial credit (demo_tasks.grade_partial)" if args.quick else "exact-match verifier"}
    result["sft_best"] = max(p["success"] for p in result["sft"])
    result["grpo_final"] = result["grpo"][-1]["success"] if result["grpo"] else None
    plot(result, work / "why_rl.png")
    (work / "why_rl.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"start {100 * result['start']['success']:.1f}% | SFT best {100 * result['sft_best']:.1f}% "
          f"after up to {args.sft_steps} more steps | GRPO {100 * (result['grpo_final'] or 0):.1f}% after "
          f"{args.rounds} steps | plot {work / 'why_rl.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
