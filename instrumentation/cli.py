"""``tracetrain run``: run any command with zero-code capture switched on.

It does what ``opentelemetry-instrument`` does, through the same standard
mechanism, and never touches the agent: the child gets OpenTelemetry's
``auto_instrumentation`` folder first on PYTHONPATH, so Python's ``site`` imports
its ``sitecustomize``, which loads the distro, the configurator and every installed
instrumentor (opentelemetry-instrumentation-openai for the LLM spans,
tracetrain's for token ids). The rest is environment:

* OTEL_EXPORTER_OTLP_ENDPOINT from ``--collector`` (default: the variable if set,
  else http://127.0.0.1:4317), OTEL_SERVICE_NAME from ``--service-name``;
* task, rollout and episode ids (and the agent name) appended to
  OTEL_RESOURCE_ATTRIBUTES under the semconv keys, so every span of the process
  carries them; the episode id defaults to a fresh one per run, as one run of an
  agent is one episode;
* OTEL_PYTHON_DISTRO / OTEL_PYTHON_CONFIGURATOR = ``tracetrain`` unless set.

Unlike ``opentelemetry-instrument`` it runs the command as a child instead of
exec'ing it, so it can outlive it (graders, rewards from the exit code, later):
termination signals are forwarded, and the child's exit status is passed
through, a death by signal included.

This is the one instrumentation module that may import click: it runs beside the
agent, never inside it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import click

from tracetrain.instrumentation import env
from tracetrain.instrumentation import semconv as sc

DEFAULT_COLLECTOR = "http://127.0.0.1:4317"
DISTRO_NAME = "tracetrain"
# Forwarded as they come. SIGINT is special, see _forward.
FORWARDED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGINT")


def auto_instrumentation_dir() -> str:
    """The folder holding OpenTelemetry's auto-instrumentation ``sitecustomize.py``."""
    spec = importlib.util.find_spec("opentelemetry.instrumentation.auto_instrumentation")
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException("opentelemetry-instrumentation is not installed: pip install tracetrain")
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


def _resource_attributes(existing: str, ids: dict[str, str | None]) -> str:
    """OTEL_RESOURCE_ATTRIBUTES with ``ids`` appended (percent-encoded; later keys win in the SDK)."""
    pairs = [f"{key}={quote(value, safe='')}" for key, value in ids.items() if value]
    return ",".join([p for p in (existing.strip().strip(","),) if p] + pairs)


def child_environment(base: dict[str, str], collector: str | None, protocol: str | None, service_name: str | None,
                      ids: dict[str, str | None]) -> dict[str, str]:
    """The child's environment: ``base`` plus capture settings. Pure, for tests."""
    child = dict(base)
    sitecustomize_dir = auto_instrumentation_dir()
    python_path = [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p and p != sitecustomize_dir]
    child["PYTHONPATH"] = os.pathsep.join([sitecustomize_dir, *python_path])
    if collector:
        child["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    else:
        child.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_COLLECTOR)
    if protocol:
        child["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    if service_name:
        child["OTEL_SERVICE_NAME"] = service_name
    child.setdefault("OTEL_PYTHON_DISTRO", DISTRO_NAME)
    child.setdefault("OTEL_PYTHON_CONFIGURATOR", DISTRO_NAME)
    child["OTEL_RESOURCE_ATTRIBUTES"] = _resource_attributes(child.get("OTEL_RESOURCE_ATTRIBUTES", ""), ids)
    for key, variable in ((sc.EPISODE_ID, env.TRACETRAIN_EPISODE_ID), (sc.TASK_ID, env.TRACETRAIN_TASK_ID),
                          (sc.ROLLOUT_ID, env.TRACETRAIN_ROLLOUT_ID)):
        if ids.get(key):
            child[variable] = ids[key]
    return child


def _in_foreground_of_a_terminal() -> bool:
    """Whether a Ctrl-C on our terminal also reaches the child (same foreground process group)."""
    try:
        with open("/dev/tty") as tty:
            return os.tcgetpgrp(tty.fileno()) == os.getpgrp()
    except OSError:
        return False


def _forward(child: subprocess.Popen) -> None:
    """Install handlers that pass signals on to the child.

    The child shares our process group so it keeps the terminal (an interactive
    agent can read stdin). A terminal's Ctrl-C therefore reaches it directly, and
    forwarding SIGINT too would deliver it twice; so SIGINT is forwarded only when
    we are not the terminal's foreground group (a supervisor signalling our pid).
    """
    interactive = _in_foreground_of_a_terminal()

    def handler(signum, _frame):
        if signum == signal.SIGINT and interactive:
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for name in FORWARDED_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, handler)


def _exit_like(returncode: int) -> None:
    """Exit with the child's status; a child killed by a signal kills us with the same one."""
    if returncode < 0:
        signum = -returncode
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        sys.exit(128 + signum)  # if the signal did not end us (e.g. it is ignorable here)
    sys.exit(returncode)


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--collector", metavar="URL", default=None,
              help=f"OTLP endpoint of the collector [default: $OTEL_EXPORTER_OTLP_ENDPOINT, else {DEFAULT_COLLECTOR}].")
@click.option("--protocol", type=click.Choice(["grpc", "http/protobuf"]), default=None,
              help="OTLP protocol [default: $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc].")
@click.option("--task-id", metavar="ID", default=None, help=f"Task of this episode (resource {sc.TASK_ID}).")
@click.option("--rollout-id", metavar="ID", default=None, help=f"Rollout sample (resource {sc.ROLLOUT_ID}).")
@click.option("--episode-id", metavar="ID", default=None,
              help=f"Episode id (resource {sc.EPISODE_ID}) [default: a fresh random id per run].")
@click.option("--agent-name", metavar="NAME", default=None, help=f"Agent name (resource {sc.GEN_AI_AGENT_NAME}).")
@click.option("--service-name", metavar="NAME", default=None, help="OTEL_SERVICE_NAME of the agent.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(collector, protocol, task_id, rollout_id, episode_id, agent_name, service_name, command):
    """Run COMMAND with zero-code capture: its LLM calls land in the collector with token ids.

    \b
    tracetrain run --task-id t-42 -- python agent.py --flag
    Uses OpenTelemetry auto-instrumentation (no change to the agent); exits with COMMAND's status.
    """
    ids = {sc.TASK_ID: task_id, sc.ROLLOUT_ID: rollout_id, sc.EPISODE_ID: episode_id or uuid.uuid4().hex,
           sc.GEN_AI_AGENT_NAME: agent_name}
    child_env = child_environment(dict(os.environ), collector, protocol, service_name, ids)
    executable = shutil.which(command[0], path=child_env.get("PATH"))
    if executable is None:
        raise click.ClickException(f"command not found: {command[0]}")
    try:
        child = subprocess.Popen([executable, *command[1:]], env=child_env)
    except OSError as error:
        raise click.ClickException(f"cannot run {command[0]}: {error}") from error
    _forward(child)
    while True:
        try:
            returncode = child.wait()
            break
        except KeyboardInterrupt:  # only if SIGINT arrived before our handler was installed
            continue
    _exit_like(returncode)
