"""`make demo`: the whole loop on this machine -- an unchanged agent learns from its own traces.

Every stage is a plain `tracetrain` command a user could type (docs/demo.md lists them):

1. `tracetrain model init` + `tracetrain model warmup --task tools --stop-at-success 0.2 --eval-every 2`:
   a tiny Qwen2 made offline, warmed up until ~20% of its tool problems succeed;
2. `tracetrain collector`: the span store;
3. `tracetrain serve`: vLLM serving that model, with versioned weight pushes;
4. `tracetrain rollout` (greedy, held-out tasks): success of the initial policy;
5. `tracetrain train --online` (GRPO, full fine-tuning) in the background, and
   `tracetrain rollout --rounds ... --await-policy` feeding it: each round is 16 fresh
   tasks x 8 samples of `examples/tool_agent.py` (plain OpenAI SDK), captured into the
   store; the trainer takes the round, updates, pushes the weights into vLLM, and the next
   round samples from the new policy; the held-out evaluation repeats every few rounds;
6. a before/after table, `reward_curve.png` and `summary.json` in the work folder.

``--quick`` is the short form CI runs: a few rounds, small batches, a fixed short warm-up.
It checks the loop closes (spans land, transitions are built, weights are pushed, later
spans carry a newer policy version) rather than that the agent learns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TT = [sys.executable, "-m", "tracetrain.collector"]  # the `tracetrain` CLI of this interpreter
AGENT = f"{ROOT / 'examples' / 'tool_agent.py'}:solve"
GRADER = f"{ROOT / 'examples' / 'demo_tasks.py'}:grade"
# the short form starts from a barely warmed-up model: partial credit keeps its groups informative
GRADER_PARTIAL = f"{ROOT / 'examples' / 'demo_tasks.py'}:grade_partial"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
               "OTEL_NODE_RESOURCE_DETECTORS": "env,host,os,process", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "tracetrain-data" / "demo"), help="fresh folder for everything")
    parser.add_argument("--rounds", type=int, default=100, help="GRPO steps (one rollout round each)")
    parser.add_argument("--eval-every", type=int, default=20, help="rounds between held-out evaluations")
    parser.add_argument("--tasks-per-round", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=128, help="episodes in flight")
    parser.add_argument("--heldout", type=int, default=256, help="held-out tasks (greedy)")
    parser.add_argument("--policy-lag", type=int, default=1,
                        help="rounds the trainer may lag behind sampling (1: sample round i+1 while it trains on i)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-stop", type=float, default=0.2, help="warm-up stops at this dev success")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-model", default=None,
                        help="start from this model folder (a copy) instead of `model init` + `model warmup`")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between trainer checkpoints (default: --eval-every)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="trainer checkpoints kept on disk")
    parser.add_argument("--partial-credit", action="store_true",
                        help="train with demo_tasks.grade_partial (0.1 for a wrong number) instead of exact match")
    parser.add_argument("--quick", action="store_true", help="CI form: 3 rounds of 8x4, 32 held-out, warm-up to 10%%")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.eval_every, args.tasks_per_round, args.group_size = 3, 3, 8, 4
        args.concurrency, args.heldout, args.warmup_stop, args.partial_credit = 32, 32, 0.1, True
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """The demo's processes, folders and timings."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.model, self.data, self.tasks = self.work / "model", self.work / "data", self.work / "tasks"
        self.state_file = self.work / "policy_state.json"
        self.grpc_port, self.http_port, self.serve_port = free_port(), free_port(), free_port()
        self.serve_url = f"http://127.0.0.1:{self.serve_port}"
        self.env = {**os.environ, **OFFLINE_ENV, "OPENAI_BASE_URL": self.serve_url + "/v1",
                    "OPENAI_API_KEY": "EMPTY", "TOOL_AGENT_MODEL": "policy-base"}
        self.procs: list[subprocess.Popen] = []
        self.seconds: dict[str, float] = {}
        self.evals: list[dict] = []
        self.rounds: list[dict] = []
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ helpers
    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def run(self, label: str, command: list[str], **kw) -> subprocess.CompletedProcess:
        self.say("$ " + " ".join(["tracetrain", *command[3:]] if command[:3] == TT else command))
        started = time.monotonic()
        done = subprocess.run(command, env=kw.pop("env", self.env), check=True, **kw)
        self.seconds[label] = self.seconds.get(label, 0.0) + time.monotonic() - started
        return done

    def start(self, command: list[str], log: str) -> subprocess.Popen:
        self.say("$ " + " ".join(["tracetrain", *command[3:]]) + f" &   (log: {log})")
        out = open(self.work / log, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_http(self, url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited with {proc.returncode}; see {self.work}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"{what} did not answer on {url} within {timeout_s:.0f} s; see {self.work}")

    def sql(self, query: str) -> list[dict]:
        out = subprocess.run([*TT, "sql", "--data", str(self.data), "--format", "json", query], env=self.env,
                             check=True, capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                    proc.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, 9)

    # ------------------------------------------------------------------ stages
    def prepare(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if self.args.start_model:
            shutil.copytree(self.args.start_model, self.model)
        else:
            self.run("model_init_s", [*TT, "model", "init", "--out", str(self.model), "--seed", str(self.args.seed)])
            # the success curve is a cliff (~14% to ~40% within 6 steps): evaluate often to stop on its edge
            warmup = ["--stop-at-success", str(self.args.warmup_stop), "--eval-every", "2"]
            self.run("warmup_s", [*TT, "model", "warmup", "--model", str(self.model), "--task", "tools",
                                  "--seed", str(self.args.seed), *warmup])
        n_train = max(self.args.rounds * self.args.tasks_per_round, 64)
        self.run("tasks_s", [sys.executable, str(ROOT / "examples" / "demo_tasks.py"), "--out", str(self.tasks),
                             "--train", str(n_train), "--heldout", str(self.args.heldout)])

    def start_services(self) -> None:
        started = time.monotonic()
        collector = self.start([*TT, "collector", "--data", str(self.data), "--grpc-endpoint",
                                f"127.0.0.1:{self.grpc_port}", "--http-endpoint", f"127.0.0.1:{self.http_port}"],
                               "collector.log")
        self.wait_http(f"http://127.0.0.1:{self.http_port}/healthz", collector, 60, "the collector")
        self.seconds["collector_start_s"] = time.monotonic() - started
        started = time.monotonic()
        serve = self.start([*TT, "serve", "--model", str(self.model), "--port", str(self.serve_port),
                            "--state-file", str(self.state_file)], "serve.log")
        self.wait_http(self.serve_url + "/v1/models", serve, 900, "vLLM (tracetrain serve)")
        self.seconds["vllm_start_s"] = time.monotonic() - started
        self.say(f"collector on 127.0.0.1:{self.grpc_port} (dashboard http://127.0.0.1:{self.http_port}/ui), "
                 f"vLLM on {self.serve_url}")

    def evaluate(self, at_step: int) -> dict:
        run_id = f"eval-{at_step}"
        env = {**self.env, "TOOL_AGENT_TEMPERATURE": "0"}
        out = self.run("eval_s", [*TT, "rollout", "--tasks", str(self.tasks / "heldout.jsonl"), "--agent", AGENT,
                                  "--grader", GRADER, "-G", "1", "-C", str(self.args.concurrency), "--run-id", run_id,
                                  "--collector", f"http://127.0.0.1:{self.grpc_port}", "--service-name", "tool-agent",
                                  "--agent-name", "tool_agent", "--failure-reward", "0", "--quiet"],
                       env=env, capture_output=True, text=True)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        versions = self.sql(f"SELECT min(policy_version) AS lo, max(policy_version) AS hi FROM llm_calls "
                            f"WHERE episode_id LIKE '{run_id}-%'")[0]
        result = {"step": at_step, "success": summary["mean_reward"] or 0.0, "episodes": summary["episodes"],
                  "policy_version_min": versions["lo"], "policy_version_max": versions["hi"]}
        self.evals.append(result)
        self.say(f"held-out success at step {at_step}: {100 * result['success']:.1f}% "
                 f"(policy version {versions['lo']}..{versions['hi']})")
        return result

    def start_trainer(self) -> subprocess.Popen:
        a = self.args
        return self.start([*TT, "train", "--online", "--algo", "grpo", "--data", str(self.data), "--model",
                           str(self.model), "--serve-url", self.serve_url, "--serve-state-file", str(self.state_file),
                           "--where", "episode_id LIKE 'train-%'", "--group-size", str(a.group_size),
                           "--batch-episodes", str(a.tasks_per_round * a.group_size), "--lr", str(a.lr),
                           "--adam-beta2", "0.99", "--minibatches", "2", "--max-steps", str(a.rounds), "--threads", "1",
                           "--poll-interval-s", "1.0", "--checkpoint-every", str(a.checkpoint_every or a.eval_every),
                           "--keep-checkpoints", str(a.keep_checkpoints),
                           "--run-id", "demo", "--out", str(self.work / "run"), "--seed", str(a.seed)], "train.log")

    def train_chunk(self, chunk: int, rounds: int, trainer: subprocess.Popen) -> None:
        a = self.args
        grader = GRADER_PARTIAL if a.partial_credit else GRADER
        command = [*TT, "rollout", "--tasks", str(self.tasks / "train.jsonl"), "--agent", AGENT, "--grader", grader,
                   "-G", str(a.group_size), "-C", str(a.concurrency), "--rounds", str(rounds),
                   "--policy-timeout-s", "10", "--on-policy-timeout", "continue", "--policy-lag", str(a.policy_lag),
                   "--tasks-per-round", str(a.tasks_per_round), "--await-policy", self.serve_url,
                   "--seed", str(a.seed * 1000 + chunk), "--run-id", f"train-c{chunk}", "--failure-reward", "0",
                   "--collector", f"http://127.0.0.1:{self.grpc_port}", "--service-name", "tool-agent",
                   "--agent-name", "tool_agent", "--quiet"]
        self.say("$ tracetrain " + " ".join(command[3:]))
        started = time.monotonic()
        proc = subprocess.Popen(command, env={**self.env, "TOOL_AGENT_TEMPERATURE": "1.0"}, stdout=subprocess.PIPE,
                                text=True)
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            info = json.loads(line)
            self.rounds.append(info)
            self.say(f"round {len(self.rounds)}/{a.rounds}: batch reward {info['mean_reward'] or 0:.2f} "
                     f"(sampled with policy v{info['policy_version']}, {info['wall_s']:.1f} s)")
            if trainer.poll() is not None:
                proc.kill()
                raise SystemExit(f"the trainer exited with {trainer.returncode}; see {self.work / 'train.log'}")
        if proc.wait() != 0:
            raise SystemExit(f"tracetrain rollout failed ({proc.returncode}); see {self.work / 'train.log'}")
        self.seconds["rollout_rounds_s"] = self.seconds.get("rollout_rounds_s", 0.0) + time.monotonic() - started

    def train(self) -> None:
        trainer = self.start_trainer()
        done, chunk = 0, 0
        while done < self.args.rounds:
            rounds = min(self.args.eval_every, self.args.rounds - done)
            self.train_chunk(chunk, rounds, trainer)
            done, chunk = done + rounds, chunk + 1
            if done == self.args.rounds:
                self.stop_trainer(trainer)  # the final evaluation sees the last pushed weights
            self.evaluate(done)

    def stop_trainer(self, trainer: subprocess.Popen) -> None:
        try:  # it stops at --max-steps; a round it had nothing to learn from leaves it one step short
            trainer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(trainer.pid, 15)  # SIGTERM: the trainer checkpoints and exits 0
            trainer.wait(timeout=120)
        if trainer.returncode != 0:
            raise SystemExit(f"the trainer exited with {trainer.returncode}; see {self.work / 'train.log'}")

    def report(self) -> dict:
        from demo_report import write_report  # examples/demo_report.py: table, plot, summary

        return write_report(self)


def main(argv: list[str] | None = None) -> int:
    demo = Demo(parse_args(argv))
    try:
        demo.prepare()
        demo.start_services()
        demo.evaluate(0)
        demo.train()
        summary = demo.report()
    finally:
        demo.stop_all()
    return 0 if summary["loop_closed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
