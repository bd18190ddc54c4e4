"""The calculator agent (examples/openai_agent.py) in the shapes `tracetrain rollout` runs.

Tasks look like ``{"id": "t1", "prompt": "What is 12*7+3?", "answer": "87"}``.

* Python callable (in-process, the fastest)::

    tracetrain rollout --tasks tasks.jsonl --agent examples/rollout_agent.py:solve \\
        --grader examples/rollout_agent.py:grade --group-size 4 --concurrency 16

  ``solve_async`` is the same agent on AsyncOpenAI.
* Command per episode (any program; examples/openai_agent.py unchanged)::

    tracetrain rollout --tasks tasks.jsonl --agent "python examples/openai_agent.py {prompt}" \\
        --grader examples/rollout_agent.py:grade

* Long-lived agent server (any language; this file is the Python reference)::

    tracetrain rollout --tasks tasks.jsonl --agent-server "python examples/rollout_agent.py --server" \\
        --grader examples/rollout_agent.py:grade

  It reads JSON-lines tasks on stdin and answers on stdout (docs/rollout.md), running
  each task inside ``tracetrain.instrumentation.episode`` with the ids it was given.

OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and MODEL (default ``tiny``) as in openai_agent.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))  # openai_agent.py beside this file
from openai_agent import run_async, run_sync  # noqa: E402

_clients: dict[str, object] = {}
_lock = threading.Lock()


def _client(kind: str):
    """One shared client per process (the OpenAI client is thread-safe and pools connections)."""
    with _lock:
        if kind not in _clients:
            base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
            api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
            cls = openai.AsyncOpenAI if kind == "async" else openai.OpenAI
            _clients[kind] = cls(base_url=base_url, api_key=api_key, max_retries=0)
        return _clients[kind]


def solve(task: dict) -> str:
    """The agent as a function: a task in, the final answer out."""
    return run_sync(_client("sync"), os.environ.get("MODEL", "tiny"), task["prompt"], False, 1)


async def solve_async(task: dict) -> str:
    return await run_async(_client("async"), os.environ.get("MODEL", "tiny"), task["prompt"], False, 1)


def grade(task: dict, answer) -> float:
    """1.0 when the expected number appears in the answer as a word, else 0.0."""
    words = str(answer).replace(".", " ").split()
    return 1.0 if str(task.get("answer")) in words else 0.0


def serve(solve_task=solve, workers: int = 32) -> None:
    """The agent-server protocol: ready line, then one task per stdin line, one result per stdout line."""
    from tracetrain.instrumentation import episode

    write_lock = threading.Lock()

    def write(message: dict) -> None:
        with write_lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def handle(message: dict) -> None:
        result = {"episode_id": message["episode_id"]}
        try:
            with episode(task_id=message["task_id"], episode_id=message["episode_id"],
                         rollout_id=message["rollout_id"]):
                result["answer"] = solve_task(message["task"])
        except Exception as error:  # noqa: BLE001 - reported to the runner as this episode's failure
            result["error"] = f"{type(error).__name__}: {error}"
        write(result)  # spans go out in batches; the SDK flushes the rest when stdin closes and we exit

    write({"type": "ready"})
    pool = ThreadPoolExecutor(workers)
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("type") == "task":
            pool.submit(handle, message)
    # EOF: the runner is done. Tasks still running were cancelled or timed out on its side:
    # export what we have and leave without waiting for them.
    pool.shutdown(wait=False, cancel_futures=True)
    from opentelemetry import trace
    getattr(trace.get_tracer_provider(), "force_flush", lambda: None)()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    if "--server" in sys.argv:
        serve()
    else:
        print(solve(json.loads(os.environ.get("TRACETRAIN_TASK") or sys.stdin.readline())))
