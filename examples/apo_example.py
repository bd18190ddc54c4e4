"""APO: optimize an agent's system prompt with any OpenAI-compatible critic (`tracetrain apo`).

No weights change: ``tracetrain apo`` runs the agent with the current system prompt,
shows the critic LLM the lowest-reward runs, lets it propose edited prompts, evaluates
them on the same tasks, and publishes each improvement as a new prompt version under
``DATA/resources/prompts/NAME/`` (docs/apo.md). The critic is whatever endpoint you
configure: ``--critic-url`` (or ``TRACETRAIN_APO_CRITIC_URL``), ``--critic-model``,
``TRACETRAIN_APO_CRITIC_API_KEY`` for hosted APIs.

The agent here, ``solve(task)``, reads its system prompt from ``$SYSTEM_PROMPT`` as an
unchanged agent would. It is a small deterministic stand-in for an instruction-following
LLM, so the example runs without one: it uses its calculator only when the prompt tells
it to calculate with a tool (otherwise it estimates to the nearest ten), and replies with
the bare number only when the prompt asks for just the number (otherwise "The answer is
N."). ``grade`` gives 1.0 for the exact number, 0.5 when the right number is in the reply.
Bring your own agent with ``--agent module:function --grader ... --tasks FILE``.

    export TRACETRAIN_APO_CRITIC_URL=http://127.0.0.1:8000   # any OpenAI-compatible server
    python examples/apo_example.py --critic-model qwen2.5-7b-instruct
    python examples/apo_example.py --quick --critic-url URL   # CI form (scripted critic): 2 rounds, 8 tasks

Prints the baseline and best score and the published versions; writes WORKDIR/apo_summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TT = [sys.executable, "-m", "tracetrain.collector"]  # the `tracetrain` CLI of this interpreter
INITIAL_PROMPT = "You are a helpful assistant."
_QUESTION = re.compile(r"(\d+)\s*([-+])\s*(\d+)")
_USES_TOOL = re.compile(r"calculat|calc tool|use the tool", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"only the number|just the number|digits only|number only|only digits", re.IGNORECASE)


def solve(task: dict) -> str:
    """One episode of the stand-in agent; its behaviour follows ``$SYSTEM_PROMPT``."""
    prompt = os.environ.get("SYSTEM_PROMPT", "")
    m = _QUESTION.search(str(task["question"]))
    if not m:
        return "I cannot answer that."
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    exact = a + b if op == "+" else a - b
    value = exact if _USES_TOOL.search(prompt) else int(round(exact, -1))  # without the tool: an estimate
    return str(value) if _BARE_NUMBER.search(prompt) else f"The answer is {value}."


def grade(task: dict, answer: str | None) -> float:
    """1.0: exactly the answer; 0.5: the right number inside a longer reply; else 0.0."""
    text = str(answer or "").strip()
    if text == str(task["answer"]):
        return 1.0
    return 0.5 if re.search(rf"(?<![\d-]){re.escape(str(task['answer']))}(?!\d)", text) else 0.0


def write_tasks(path: Path, n: int) -> None:
    """``n`` arithmetic tasks of the demo (examples/demo_tasks.py), training side."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_tasks import make_tasks

    tasks = [t for t in make_tasks(4 * n, 0, "train") if t["kind"] in ("add", "sub")][:n]
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--critic-url", default=os.environ.get("TRACETRAIN_APO_CRITIC_URL"),
                        help="OpenAI-compatible critic endpoint (default $TRACETRAIN_APO_CRITIC_URL)")
    parser.add_argument("--critic-model", default=os.environ.get("TRACETRAIN_APO_CRITIC_MODEL", "critic"))
    parser.add_argument("--workdir", default=str(ROOT / "tracetrain-data" / "apo"), help="store and outputs")
    parser.add_argument("--agent", default=f"{Path(__file__).resolve()}:solve")
    parser.add_argument("--grader", default=f"{Path(__file__).resolve()}:grade")
    parser.add_argument("--tasks", help="JSON lines with an id (default: demo arithmetic tasks)")
    parser.add_argument("--n-tasks", type=int, default=32)
    parser.add_argument("--initial-prompt", default=INITIAL_PROMPT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--collector", help="OTLP endpoint of a collector already writing WORKDIR/data "
                                            "(default: start one)")
    parser.add_argument("--evaluation", choices=("inline", "rollout"), default="inline",
                        help="inline: call solve() here, the critic sees each task and answer; rollout: "
                             "tracetrain rollout's runner, runs captured as episodes (for agents whose LLM calls "
                             "are traced: the critic then reads their messages from the store)")
    parser.add_argument("--quick", action="store_true", help="CI form: 2 rounds of 2 candidates, 8 tasks")
    args = parser.parse_args(argv)
    if not args.critic_url:
        parser.error("give --critic-url or set TRACETRAIN_APO_CRITIC_URL (an OpenAI-compatible endpoint)")
    if args.quick:
        args.rounds, args.candidates, args.n_tasks = 2, 2, 8
    return args


def read_rounds(data: Path, run_id: str) -> list[dict]:
    from tracetrain.trainer import store

    con = store.connect(data)
    try:
        rows = con.execute("SELECT step, reward_mean, success_rate, policy_version, n_episodes, skipped "
                           "FROM train_steps WHERE run_id = ? ORDER BY step", [run_id]).fetchall()
    finally:
        con.close()
    keys = ("step", "best_score", "success_rate", "prompt_version", "runs", "skipped")
    return [dict(zip(keys, r)) for r in rows]


def start_collector(work: Path):
    """A `tracetrain collector` on free loopback ports (examples/demo.py's helpers): (demo, OTLP URL)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo import TT as DEMO_TT
    from demo import Demo
    from demo import parse_args as demo_args

    demo = Demo(demo_args(["--workdir", str(work)]))
    collector = demo.start([*DEMO_TT, "collector", "--data", str(demo.data), "--grpc-endpoint",
                            f"127.0.0.1:{demo.grpc_port}", "--http-endpoint", f"127.0.0.1:{demo.http_port}"],
                           "collector.log")
    demo.wait_http(f"http://127.0.0.1:{demo.http_port}/healthz", collector, 60, "the collector")
    return demo, f"http://127.0.0.1:{demo.grpc_port}"


def run_apo(args: argparse.Namespace, data: Path, tasks: Path, collector: str, run_id: str) -> dict:
    command = [*TT, "apo", "--data", str(data), "--critic-url", args.critic_url, "--critic-model",
               args.critic_model, "--agent", args.agent, "--grader", args.grader, "--tasks", str(tasks),
               "--rounds", str(args.rounds), "--candidates", str(args.candidates), "--prompt-name", "example",
               "--initial-prompt", args.initial_prompt, "--run-id", run_id, "--evaluation", args.evaluation,
               "--collector", collector]
    print("$ tracetrain " + " ".join(command[3:]), flush=True)
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tracetrain apo failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    tasks = Path(args.tasks) if args.tasks else work / "tasks.jsonl"
    if not args.tasks:
        write_tasks(tasks, args.n_tasks)
    run_id = f"apo-example-{os.getpid()}"
    demo, collector = (None, args.collector) if args.collector else start_collector(work)
    try:
        result = run_apo(args, data, tasks, collector, run_id)
    finally:
        if demo is not None:
            demo.stop_all()
    rounds = read_rounds(data, run_id)
    versions = sorted((data / "resources" / "prompts" / "example").glob("v*.json"), key=lambda p: int(p.stem[1:]))
    published = [json.loads(p.read_text()) for p in versions]
    summary = {**result, "critic_url": args.critic_url, "critic_model": args.critic_model, "rounds": rounds,
               "published": [{k: v.get(k) for k in ("version", "parent_version", "score", "prompt")}
                             for v in published if v.get("run_id") == run_id], "quick": args.quick}
    print(f"\n  baseline score {result['baseline_score']:.3f} -> best {result['best_score']:.3f} "
          f"(prompt v{result['best_version']}): {result['prompt']!r}")
    for v in summary["published"]:
        print(f"  v{v['version']} (parent v{v['parent_version']}) score {v['score']}: {v['prompt']!r}")
    (work / "apo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {work / 'apo_summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
