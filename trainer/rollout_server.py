"""``ServerAgent``: long-lived agent processes fed many tasks over JSON lines (any language).

The protocol (docs/rollout.md "Agent server protocol"): the runner starts the command
with capture variables set (as ``tracetrain run`` does, without per-episode ids); the
process writes ``{"type": "ready"}`` as its first JSON line on stdout, then reads one
task per line on stdin::

    {"type": "task", "episode_id": "...", "task_id": "...", "rollout_id": "0",
     "task": {...}, "traceparent": "00-...-...-01", "timeout_s": 300}

and answers each, in any order, with one line::

    {"episode_id": "...", "answer": ...}            # or "error": "why"; optional "reward": 1.0

A ``{"type": "cancel", "episode_id": ...}`` line tells it a task timed out. EOF on stdin
means shut down. Lines that are not JSON objects are ignored (a stray print is harmless).
A process that exits fails the tasks it held and is restarted; one whose every slot
timed out in a row is killed and restarted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import threading
import time
from typing import Any

from opentelemetry import trace

from .rollout_agents import FAILED, OK, TIMEOUT, AgentOutcome, _kill_group, _reward_value, capture_environment, \
    traceparent

logger = logging.getLogger(__name__)
MAX_RESTARTS = 10


class ServerProcess:
    """One agent process and the tasks it has in flight."""

    def __init__(self, argv: list[str], env: dict[str, str], startup_timeout_s: float, index: int):
        self.argv, self.env, self.startup_timeout_s, self.index = argv, env, startup_timeout_s, index
        self.lock = threading.Lock()
        # episode id -> (its future, the process it was sent to): a dying process fails only its own tasks
        self.pending: dict[str, tuple[concurrent.futures.Future, subprocess.Popen]] = {}
        self.process: subprocess.Popen | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.timeouts_in_a_row = 0
        self.starts = 0

    def load(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        """Start the process and wait for its ready line (raises ValueError if none comes)."""
        self.starts += 1
        ready = threading.Event()
        process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=self.env, text=True, bufsize=1, start_new_session=True)
        self.process = process
        threading.Thread(target=self._read_stdout, args=(process, ready), daemon=True,
                         name=f"agent-server-{self.index}").start()
        threading.Thread(target=self._read_stderr, args=(process,), daemon=True).start()
        if not ready.wait(self.startup_timeout_s):
            _kill_group(process)
            raise ValueError(f"agent server {shlex.join(self.argv)!r} wrote no {{\"type\": \"ready\"}} line within "
                             f"{self.startup_timeout_s:g} s; stderr: {' | '.join(self.stderr_tail)[-800:]}")

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.stderr_tail.append(line.rstrip())

    def _read_stdout(self, process: subprocess.Popen, ready: threading.Event) -> None:
        for line in process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("type") == "ready":
                ready.set()
                continue
            with self.lock:
                entry = self.pending.pop(str(message.get("episode_id")), None)
            if entry is not None:
                entry[0].set_result(message)
        code = process.wait()
        with self.lock:
            lost = [eid for eid, (_, sent_to) in self.pending.items() if sent_to is process]
            boxes = [self.pending.pop(eid)[0] for eid in lost]
        for box in boxes:
            box.set_result({"_exited": code})

    def _ensure_running(self) -> None:
        """Restart a dead or wedged process (called with ``self.lock`` held)."""
        dead = self.process is None or self.process.poll() is not None
        if not dead:
            return
        if self.starts > MAX_RESTARTS:
            raise RuntimeError(f"agent server exited {self.starts} times; giving up on it")
        self.start()

    def submit(self, spec: Any, timeout_s: float, span: trace.Span) -> AgentOutcome:
        message = {"type": "task", "episode_id": spec.episode_id, "task_id": spec.task_id,
                   "rollout_id": spec.rollout_id, "task": spec.task, "traceparent": traceparent(span),
                   "timeout_s": timeout_s}
        box: concurrent.futures.Future = concurrent.futures.Future()
        try:
            with self.lock:
                self._ensure_running()
                self.pending[spec.episode_id] = (box, self.process)
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
        except (OSError, ValueError, RuntimeError) as error:
            with self.lock:
                self.pending.pop(spec.episode_id, None)
            return AgentOutcome(FAILED, error=f"cannot send the task to the agent server: {error}")
        try:
            reply = box.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self._timed_out(spec.episode_id)
            return AgentOutcome(TIMEOUT, error=f"no answer within {timeout_s:g} s")
        self.timeouts_in_a_row = 0
        return _outcome(reply, self.stderr_tail)

    def _timed_out(self, episode_id: str) -> None:
        with self.lock:
            self.pending.pop(episode_id, None)
            self.timeouts_in_a_row += 1
            wedged = self.timeouts_in_a_row >= max(1, self.capacity)
            process = self.process
            try:
                process.stdin.write(json.dumps({"type": "cancel", "episode_id": episode_id}) + "\n")
                process.stdin.flush()
            except (OSError, ValueError):
                pass
        if wedged and process is not None:
            logger.warning("agent server %d: %d timeouts in a row, restarting it", self.index, self.timeouts_in_a_row)
            self.timeouts_in_a_row = 0
            _kill_group(process)
            try:  # dead before the next task is sent, so that task goes to a fresh process
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass

    capacity = 1

    def end_input(self) -> None:
        """EOF on the process's stdin: it should flush its spans and exit."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def close(self, deadline: float) -> None:
        """Wait for the process to exit until ``deadline`` (monotonic), then kill its group."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(process)


def _outcome(reply: dict, stderr_tail: collections.deque) -> AgentOutcome:
    if "_exited" in reply:
        tail = stderr_tail[-1] if stderr_tail else ""
        return AgentOutcome(FAILED, error=f"agent server exited with code {reply['_exited']}: {tail[:500]}".rstrip(": "),
                            exit_code=reply["_exited"])
    if reply.get("error"):
        return AgentOutcome(FAILED, answer=reply.get("answer"), error=str(reply["error"])[:2000])
    return AgentOutcome(OK, answer=reply.get("answer"), reward=_reward_value(reply.get("reward")))


class ServerAgent:
    """``processes`` long-lived copies of ``command``, each fed up to concurrency/processes tasks at once."""

    in_process = False

    def __init__(self, command: str | list[str], processes: int = 1, service_name: str | None = None,
                 startup_timeout_s: float = 120.0):
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv or processes < 1:
            raise ValueError("agent server needs a command and processes >= 1")
        self.processes_wanted = processes
        self.service_name = service_name
        self.startup_timeout_s = startup_timeout_s
        self.processes: list[ServerProcess] = []
        self.pick_lock = threading.Lock()

    def start(self, tracing: Any, concurrency: int, timeout_s: float) -> None:
        if shutil.which(self.argv[0]) is None:
            raise ValueError(f"agent server command not found: {self.argv[0]}")
        env = capture_environment(dict(os.environ), tracing.collector, tracing.protocol, self.service_name, {})
        capacity = math.ceil(concurrency / self.processes_wanted)
        for index in range(self.processes_wanted):
            server = ServerProcess(self.argv, env, self.startup_timeout_s, index)
            server.capacity = capacity
            self.processes.append(server)
        errors: list[str] = []  # started side by side: start-up time is paid once, not per process
        starters = [threading.Thread(target=self._start_one, args=(p, errors), daemon=True) for p in self.processes]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join()
        if errors:
            self.close()
            raise ValueError(errors[0])

    def _start_one(self, server: ServerProcess, errors: list) -> None:
        try:
            server.start()
        except (OSError, ValueError) as error:
            errors.append(str(error))

    def run(self, spec: Any, timeout_s: float, span: trace.Span) -> AgentOutcome:
        with self.pick_lock:
            server = min(self.processes, key=ServerProcess.load)
        return server.submit(spec, timeout_s, span)

    def close(self, grace_s: float = 10.0) -> None:
        """EOF to every process at once, then up to ``grace_s`` in all for them to exit."""
        for server in self.processes:
            server.end_input()
        deadline = time.monotonic() + grace_s
        for server in self.processes:
            server.close(deadline)


__all__ = ["OK", "FAILED", "TIMEOUT", "ServerAgent", "ServerProcess"]
