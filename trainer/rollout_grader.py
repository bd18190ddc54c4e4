"""Graders: turn (task, answer) into a reward for agents that do not reward themselves.

* a Python callable ``grade(task: dict, answer) -> float`` (or ``"module:function"``);
* a command (``CommandGrader``): gets ``$TRACETRAIN_TASK`` and ``$TRACETRAIN_ANSWER``
  (JSON), and ``{"task": ..., "answer": ...}`` on stdin; prints the reward as its last
  stdout line. A non-zero exit or a non-number is a grading failure (no reward).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from .rollout_agents import TASK_ENV, is_callable_spec, load_callable

ANSWER_ENV = "TRACETRAIN_ANSWER"
DEFAULT_GRADER_TIMEOUT_S = 60.0


class Grader(Protocol):
    def grade(self, task: dict, answer: Any, timeout_s: float | None = None) -> float: ...


class CallableGrader:
    """``function(task, answer) -> float``."""

    def __init__(self, function: Callable | str):
        self.function = load_callable(function) if isinstance(function, str) else function

    def grade(self, task: dict, answer: Any, timeout_s: float | None = None) -> float:
        return float(self.function(task, answer))


class CommandGrader:
    """A command per grading: task and answer in, a number out."""

    def __init__(self, command: str | list[str], timeout_s: float = DEFAULT_GRADER_TIMEOUT_S):
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv or shutil.which(self.argv[0]) is None:
            raise ValueError(f"grader command not found: {self.argv[0] if self.argv else '(empty)'}")
        self.timeout_s = timeout_s

    def grade(self, task: dict, answer: Any, timeout_s: float | None = None) -> float:
        env = {**os.environ, TASK_ENV: json.dumps(task), ANSWER_ENV: json.dumps(answer)}
        out = subprocess.run(self.argv, input=json.dumps({"task": task, "answer": answer}) + "\n", env=env,
                             capture_output=True, text=True, timeout=timeout_s or self.timeout_s)
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"grader exit code {out.returncode}: {tail[0][:300]}")
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if not lines:
            raise ValueError("grader printed nothing")
        return float(lines[-1])


def make_grader(grader: Any) -> Grader | None:
    """A Grader from None, a Grader, a callable, ``module:function`` or a command string."""
    if grader is None or hasattr(grader, "grade"):
        return grader
    if callable(grader):
        return CallableGrader(grader)
    if isinstance(grader, str) and grader.strip():
        return CallableGrader(grader) if is_callable_spec(grader.strip()) else CommandGrader(grader)
    raise ValueError(f"grader must be a callable, 'module:function' or a command, got {grader!r}")
