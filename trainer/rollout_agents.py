"""The three ways the rollout runner runs an agent (docs/rollout.md).

* ``CallableAgent``: a Python function ``f(task: dict) -> answer`` (or ``async def``),
  imported once and called concurrently in this process, each call under its episode span;
* ``CommandAgent``: one process per episode, captured like ``tracetrain run``;
* ``ServerAgent``: long-lived processes speaking the JSON-lines protocol on stdin/stdout.

Each ``run(spec, timeout_s, span)`` returns an ``AgentOutcome`` and never raises for
the agent's own failures: a crash, a non-zero exit, an exception or a timeout is an
outcome like an answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

# A command agent is launched exactly as `tracetrain run` launches one.
from tracetrain.instrumentation.cli import child_environment as capture_environment

OK, FAILED, TIMEOUT = "ok", "failed", "timeout"
CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TASK_ENV = "TRACETRAIN_TASK"
TRACEPARENT_ENV = "TRACEPARENT"
PLACEHOLDERS = ("{task}", "{prompt}", "{task_id}", "{episode_id}", "{rollout_id}")


@dataclass
class AgentOutcome:
    """What one agent run gave: ``status`` ok | failed | timeout."""

    status: str
    answer: Any = None
    reward: float | None = None  # a reward the agent reported in its result
    error: str | None = None
    exit_code: int | None = None


class Agent(Protocol):
    in_process: bool

    def start(self, tracing: Any, concurrency: int, timeout_s: float) -> None: ...
    def run(self, spec: Any, timeout_s: float, span: trace.Span) -> AgentOutcome: ...
    def close(self) -> None: ...


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def load_callable(spec: str) -> Callable:
    """``module:function`` (dotted attribute path allowed) -> the function; ``path/file.py:function`` too."""
    module_name, _, attribute = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        target: Any = module
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as error:  # noqa: BLE001 - reported as bad input
        raise ValueError(f"cannot load {spec!r}: {_error_text(error)}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


def is_callable_spec(text: str) -> bool:
    """Whether ``text`` names a Python function (``module:function`` / ``file.py:function``), not a command."""
    return bool(CALLABLE_SPEC.match(text)) or (" " not in text and bool(re.match(r"^\S+\.py:[A-Za-z_]\w*$", text)))


def make_agent(agent: Any, service_name: str | None = None) -> Agent:
    """An Agent from an Agent, a callable, ``module:function`` or a command string."""
    if hasattr(agent, "run") and hasattr(agent, "in_process"):
        return agent
    if callable(agent):
        return CallableAgent(agent)
    if isinstance(agent, str) and agent.strip():
        return CallableAgent(agent.strip()) if is_callable_spec(agent.strip()) else CommandAgent(agent, service_name)
    raise ValueError(f"agent must be a callable, 'module:function' or a command, got {agent!r}")


class CallableAgent:
    """A Python function called concurrently in this process, one episode per call."""

    in_process = True

    def __init__(self, function: Callable | str):
        self.function = load_callable(function) if isinstance(function, str) else function
        self.is_async = inspect.iscoroutinefunction(self.function)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, tracing: Any, concurrency: int, timeout_s: float) -> None:
        if self.is_async:  # one event loop runs every coroutine; worker threads wait on their futures
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self._serve_loop, args=(self.loop,), name="rollout-loop", daemon=True).start()

    @staticmethod
    def _serve_loop(loop: asyncio.AbstractEventLoop) -> None:
        loop.run_forever()  # until close() stops it; an online trainer starts one per rollout batch
        loop.close()

    async def _call_async(self, task: dict, parent: otel_context.Context) -> Any:
        token = otel_context.attach(parent)
        try:
            return await self.function(task)
        finally:
            otel_context.detach(token)

    def _call_sync(self, task: dict, parent: otel_context.Context, box: concurrent.futures.Future) -> None:
        token = otel_context.attach(parent)
        try:
            box.set_result(self.function(task))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting worker
            box.set_exception(error)
        finally:
            otel_context.detach(token)

    def run(self, spec: Any, timeout_s: float, span: trace.Span) -> AgentOutcome:
        parent = trace.set_span_in_context(span)
        task = copy.deepcopy(spec.task)  # G samples share the task dict
        if self.is_async:
            assert self.loop is not None
            box = asyncio.run_coroutine_threadsafe(self._call_async(task, parent), self.loop)
        else:
            # A thread per call: a hung sync call cannot be interrupted, only abandoned (daemon).
            box = concurrent.futures.Future()
            threading.Thread(target=self._call_sync, args=(task, parent, box), daemon=True).start()
        try:
            return AgentOutcome(OK, answer=box.result(timeout=timeout_s))
        except concurrent.futures.TimeoutError:
            box.cancel()  # cancels a coroutine; a sync call runs on, unobserved
            return AgentOutcome(TIMEOUT, error=f"no answer within {timeout_s:g} s")
        except Exception as error:  # noqa: BLE001 - the agent's exception is the episode's failure
            return AgentOutcome(FAILED, error=_error_text(error))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)


def traceparent(span: trace.Span) -> str:
    """W3C traceparent of ``span``."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def parse_result_line(stdout: str) -> tuple[Any, float | None]:
    """(answer, reward) from a command's stdout: its last non-empty line, or ``{"answer", "reward"}`` JSON there."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("{"):
        try:
            message = json.loads(last)
        except json.JSONDecodeError:
            return last, None
        if isinstance(message, dict) and "answer" in message:
            return message["answer"], _reward_value(message.get("reward"))
    return last, None


def _reward_value(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class CommandAgent:
    """One process per episode: ``command`` (a string split like a shell, or argv), captured like ``tracetrain run``.

    The task is handed over three ways at once: ``$TRACETRAIN_TASK`` (JSON), stdin (JSON,
    one line, then EOF) and placeholders in the arguments (``{task}`` JSON, ``{prompt}``
    the task's ``prompt``, ``{task_id}``, ``{episode_id}``, ``{rollout_id}``). The last
    non-empty stdout line is the answer.
    """

    in_process = False

    def __init__(self, command: str | list[str], service_name: str | None = None):
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise ValueError("empty agent command")
        self.service_name = service_name
        self.tracing: Any = None

    def start(self, tracing: Any, concurrency: int, timeout_s: float) -> None:
        if shutil.which(self.argv[0]) is None:
            raise ValueError(f"agent command not found: {self.argv[0]}")
        self.tracing = tracing

    def _argv(self, spec: Any) -> list[str]:
        values = {"{task}": json.dumps(spec.task), "{prompt}": str(spec.task.get("prompt", "")),
                  "{task_id}": spec.task_id, "{episode_id}": spec.episode_id, "{rollout_id}": spec.rollout_id}
        argv = []
        for argument in self.argv:
            for placeholder in PLACEHOLDERS:
                argument = argument.replace(placeholder, values[placeholder])
            argv.append(argument)
        return argv

    def run(self, spec: Any, timeout_s: float, span: trace.Span) -> AgentOutcome:
        env = capture_environment(dict(os.environ), self.tracing.collector, self.tracing.protocol, self.service_name,
                                  spec.ids())
        env[TASK_ENV] = json.dumps(spec.task)
        env[TRACEPARENT_ENV] = traceparent(span)
        try:  # its own session, so a timeout kills the agent and everything it started
            process = subprocess.Popen(self._argv(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, text=True, start_new_session=True)
        except OSError as error:
            return AgentOutcome(FAILED, error=f"cannot start agent: {error}")
        try:
            stdout, stderr = process.communicate(json.dumps(spec.task) + "\n", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return AgentOutcome(TIMEOUT, error=f"no exit within {timeout_s:g} s (killed)")
        if process.returncode != 0:
            tail = (stderr or "").strip().splitlines()[-1:] or [""]
            how = (f"killed by signal {-process.returncode}" if process.returncode < 0
                   else f"exit code {process.returncode}")
            return AgentOutcome(FAILED, error=f"{how}: {tail[0][:500]}".rstrip(": "), exit_code=process.returncode)
        answer, reward = parse_result_line(stdout)
        return AgentOutcome(OK, answer=answer, reward=reward, exit_code=0)

    def close(self) -> None:
        pass


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        process.kill()


def python_command(*args: str) -> list[str]:
    """argv running this interpreter (examples and tests start Python agents with it)."""
    return [sys.executable, *args]
