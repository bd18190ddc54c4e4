"""Rollout benchmark: episodes/s of `tracetrain rollout` for each way of running the agent.

    .venv/bin/python bench/rollout.py [--episodes 256] [--concurrency 16] [--command-episodes 16] [--out bench/results]

Starts a real `tracetrain collector` and the fake vLLM server (examples/fake_vllm_server.py,
byte-level ids and logprobs, answers at once) in their own processes, then runs the same
calculator agent (2 LLM calls per episode, graded) as:

* ``callable``: ``--agent examples/rollout_agent.py:solve`` (in-process threads);
* ``callable_async``: ``--agent examples/rollout_agent.py:solve_async`` (one event loop);
* ``server_1`` / ``server_2``: ``--agent-server "python examples/rollout_agent.py --server"``, 1 or 2 processes;
* ``command``: ``--agent "python examples/openai_agent.py {prompt}"``, a Python process per episode.

Each mode's episodes are counted in the store afterwards (episodes with 2 LLM calls and
reward 1.0). Writes bench/results/rollout-<UTC date>.json and prints it. The model here
costs nothing, so the figures are the runner's and capture's own ceiling: with a real
model the LLM dominates and the modes differ only by their fixed costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_support import free_port, wait_http  # noqa: E402

BIN = Path(sys.executable).parent
EXAMPLES = ROOT / "examples"


def _tasks(n: int) -> list[dict]:
    return [{"id": f"t{i}", "prompt": f"What is {i % 89 + 2}*{i % 7 + 3}?", "answer": str((i % 89 + 2) * (i % 7 + 3))}
            for i in range(n)]


def _modes(concurrency: int) -> dict[str, list[str]]:
    agent = str(EXAMPLES / "rollout_agent.py")
    return {
        "callable": ["--agent", f"{agent}:solve", "-C", str(concurrency)],
        "callable_async": ["--agent", f"{agent}:solve_async", "-C", str(concurrency)],
        "server_1": ["--agent-server", f"{sys.executable} {agent} --server", "-C", str(concurrency)],
        "server_2": ["--agent-server", f"{sys.executable} {agent} --server", "--server-processes", "2",
                     "-C", str(concurrency)],
        "command": ["--agent", f"{sys.executable} {EXAMPLES / 'openai_agent.py'} {{prompt}}", "-C", "4"],
    }


def run_mode(name: str, flags: list[str], n_episodes: int, collector_port: int, fake_url: str, work: Path,
             data_dir: Path) -> dict:
    tasks_file = work / f"{name}.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in _tasks(n_episodes)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACETRAIN_"))}
    env.update(OPENAI_BASE_URL=fake_url, OPENAI_API_KEY="EMPTY")
    command = [str(BIN / "tracetrain"), "rollout", "--tasks", str(tasks_file), "--collector",
               f"http://127.0.0.1:{collector_port}", "--grader", f"{EXAMPLES / 'rollout_agent.py'}:grade",
               "--run-id", name, "--quiet", "--timeout-s", "120", *flags]
    started = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    total_s = time.perf_counter() - started
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    from tracetrain.trainer.store import connect
    stored = connect(data_dir).execute(
        "SELECT count(*), count(*) FILTER (WHERE n_llm_calls = 2 AND reward = 1.0) FROM episodes "
        "WHERE episode_id LIKE ?", [name + "-%"]).fetchone()
    return {"flags": flags, "summary": summary, "episodes_per_s": summary["episodes_per_s"],
            "process_total_s": round(total_s, 2), "stored_episodes": stored[0], "stored_complete": stored[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--command-episodes", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--modes", default="callable,callable_async,server_1,server_2,command")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    data_dir = work / "data"
    grpc_port, http_port, fake_port = free_port(), free_port(), free_port()
    processes = [
        subprocess.Popen([str(BIN / "tracetrain"), "collector", "--data", str(data_dir), "--grpc-endpoint",
                          f"127.0.0.1:{grpc_port}", "--http-endpoint", f"127.0.0.1:{http_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
        subprocess.Popen([sys.executable, str(EXAMPLES / "fake_vllm_server.py"), "--port", str(fake_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    results: dict = {}
    try:
        wait_http(f"http://127.0.0.1:{fake_port}/v1/models", 60)
        wait_http(f"http://127.0.0.1:{http_port}/metrics", 60)
        load_before = os.getloadavg()
        modes = _modes(args.concurrency)
        for name in args.modes.split(","):
            n = args.command_episodes if name == "command" else args.episodes
            results[name] = run_mode(name, modes[name], n, grpc_port, f"http://127.0.0.1:{fake_port}/v1", work,
                                     data_dir)
            print(name, json.dumps(results[name].get("summary") or results[name]), flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"bench": "rollout", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "commit": commit,
                          "load_before": load_before, "load_after": os.getloadavg()},
              "llm": "examples/fake_vllm_server.py (instant answers; 2 LLM calls per episode)",
              "concurrency": args.concurrency, "modes": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rollout-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v.get("episodes_per_s") for k, v in results.items()}), "->", path)


if __name__ == "__main__":
    main()
