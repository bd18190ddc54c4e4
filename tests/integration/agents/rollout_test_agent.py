"""Agent for the rollout tests, behaving as each task's "behave" says.

ok (default): the calculator agent of examples/rollout_agent.py; raise: an exception;
crash: exit code 3 (command mode); hang: never answers; slow: sleeps 0.4 s and answers
with the peak number of concurrent calls seen; selfreward: emits its own reward 0.5.
Callable (``solve``, ``solve_async``), command (``python rollout_test_agent.py``) and
agent server (``--server``) shapes, like the example.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import rollout_agent  # noqa: E402

_lock = threading.Lock()
_active = 0
_peak = 0


def _enter() -> None:
    global _active, _peak
    with _lock:
        _active += 1
        _peak = max(_peak, _active)


def _leave() -> int:
    global _active
    with _lock:
        _active -= 1
        return _peak


def solve(task: dict):
    behave = task.get("behave", "ok")
    if behave == "raise":
        raise RuntimeError("agent bug")
    if behave == "crash":
        sys.stdout.flush()
        os._exit(3)
    if behave == "hang":
        time.sleep(3600)
    if behave == "slow":
        _enter()
        time.sleep(0.4)
        return f"peak {_leave()}"
    if behave == "selfreward":
        from tracetrain.instrumentation import emit_reward
        emit_reward(0.5, name="self")
    return rollout_agent.solve(task)


async def solve_async(task: dict):
    if task.get("behave") == "slow":
        _enter()
        await asyncio.sleep(0.4)
        return f"peak {_leave()}"
    if task.get("behave") == "hang":
        await asyncio.sleep(3600)
    return await rollout_agent.solve_async(task)


if __name__ == "__main__":
    if "--server" in sys.argv:
        rollout_agent.serve(solve)
    else:
        print(solve(json.loads(sys.stdin.readline())))
