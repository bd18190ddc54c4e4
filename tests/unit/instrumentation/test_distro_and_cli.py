"""The distro/configurator entry points and ``tracetrain run``'s environment, exit status and signals."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracetrain.instrumentation import drops
from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.cli import auto_instrumentation_dir, child_environment, run_command
from tracetrain.instrumentation.distro import (
    ENV_DEFAULTS, DropCountingSpanExporter, TracetrainConfigurator, TracetrainDistro, apply_env_defaults,
)
from tracetrain.instrumentation.openai_capture import TracetrainOpenAIInstrumentor

TRACETRAIN = str(Path(sys.executable).with_name("tracetrain"))


def _entry_point(group: str, name: str):
    (found,) = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
    return found.load()


def test_entry_points_resolve_to_the_classes():
    assert _entry_point("opentelemetry_distro", "tracetrain") is TracetrainDistro
    assert _entry_point("opentelemetry_configurator", "tracetrain") is TracetrainConfigurator
    assert _entry_point("opentelemetry_instrumentor", "tracetrain_openai") is TracetrainOpenAIInstrumentor
    assert _entry_point("tracetrain.cli", "run") is run_command


def test_defaults_never_override_the_user(monkeypatch):
    for name in ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("TRACELOOP_TRACE_CONTENT", "false")
    apply_env_defaults()
    assert os.environ["OTEL_METRICS_EXPORTER"] == "otlp" and os.environ["TRACELOOP_TRACE_CONTENT"] == "false"
    assert os.environ["OTEL_TRACES_EXPORTER"] == "otlp" and os.environ["OTEL_LOGS_EXPORTER"] == "none"
    assert os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] == "SPAN_ONLY"


class _FailingExporter(SpanExporter):
    def __init__(self, result=SpanExportResult.FAILURE, error: Exception | None = None):
        self.result, self.error = result, error

    def export(self, spans):
        if self.error:
            raise self.error
        return self.result


def test_undelivered_spans_are_counted_drops():
    drops.reset_drop_counts()
    assert DropCountingSpanExporter(_FailingExporter()).export([object()] * 3) is SpanExportResult.FAILURE
    assert DropCountingSpanExporter(_FailingExporter(error=OSError("down"))).export([object()]) \
        is SpanExportResult.FAILURE
    assert DropCountingSpanExporter(_FailingExporter(SpanExportResult.SUCCESS)).export([object()]) \
        is SpanExportResult.SUCCESS
    assert sum(drops.drop_counts().values()) == 4
    drops.reset_drop_counts()


def test_configurator_builds_the_sdk_from_env():
    """In a fresh process: the configurator sets the global provider (once per process)."""
    code = ("from opentelemetry import trace\n"
            "from tracetrain.instrumentation.distro import TracetrainConfigurator, DropCountingSpanExporter\n"
            "TracetrainConfigurator().configure()\n"
            "provider = trace.get_tracer_provider()\n"
            "(processor,) = provider._active_span_processor._span_processors\n"
            "exporter = processor._batch_processor._exporter\n"
            "assert isinstance(exporter, DropCountingSpanExporter), exporter\n"
            "print(type(exporter.exporter).__module__, provider.resource.attributes['service.name'])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_SERVICE_NAME="cfg-test", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "cfg-test"]


# ---------------------------------------------------------------- tracetrain run


def test_child_environment():
    ids = {sc.TASK_ID: "t 1,x", sc.EPISODE_ID: "ep-1", sc.ROLLOUT_ID: None, sc.GEN_AI_AGENT_NAME: "calc"}
    base = {"PYTHONPATH": "/a", "OTEL_RESOURCE_ATTRIBUTES": "team=rl", "OTEL_PYTHON_DISTRO": "other"}
    child = child_environment(base, "http://127.0.0.1:5555", None, "svc", ids)
    assert child["PYTHONPATH"].split(os.pathsep) == [auto_instrumentation_dir(), "/a"]
    assert child["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:5555" and child["OTEL_SERVICE_NAME"] == "svc"
    assert child["OTEL_RESOURCE_ATTRIBUTES"] == ("team=rl,tracetrain.task.id=t%201%2Cx,"
                                                 "tracetrain.episode.id=ep-1,gen_ai.agent.name=calc")
    assert child["OTEL_PYTHON_DISTRO"] == "other" and child["OTEL_PYTHON_CONFIGURATOR"] == "tracetrain"
    assert child["TRACETRAIN_EPISODE_ID"] == "ep-1" and "TRACETRAIN_ROLLOUT_ID" not in child
    assert (Path(auto_instrumentation_dir()) / "sitecustomize.py").is_file()


def test_collector_flag_then_env_then_default():
    ids: dict = {}
    assert child_environment({}, None, None, None, ids)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"
    from_env = child_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:1"}, None, None, None, ids)
    assert from_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://h:1"
    flagged = child_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:1"}, "http://h:2", "http/protobuf", None,
                                ids)
    assert flagged["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://h:2"
    assert flagged["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"


def test_help():
    result = CliRunner().invoke(run_command, ["--help"])
    assert result.exit_code == 0 and "--task-id" in result.output and "--collector" in result.output


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([TRACETRAIN, "run", *command], env=env, capture_output=True, text=True, timeout=60,
                          **kwargs)


def test_child_sees_the_ids_and_exit_status_passes_through():
    code = ("import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in "
            "('OTEL_RESOURCE_ATTRIBUTES', 'TRACETRAIN_TASK_ID', 'TRACETRAIN_EPISODE_ID')})); sys.exit(3)")
    out = _run("--task-id", "t-7", "--", sys.executable, "-c", code)
    assert out.returncode == 3, out.stderr
    seen = json.loads(out.stdout)
    assert seen["TRACETRAIN_TASK_ID"] == "t-7" and len(seen["TRACETRAIN_EPISODE_ID"]) == 32
    assert f"tracetrain.episode.id={seen['TRACETRAIN_EPISODE_ID']}" in seen["OTEL_RESOURCE_ATTRIBUTES"]


def test_child_killed_by_a_signal_kills_us_alike():
    out = _run("--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert out.returncode == -signal.SIGTERM


def test_unknown_command_is_a_clear_error():
    out = _run("--", "no-such-command-xyz")
    assert out.returncode == 1 and "command not found: no-such-command-xyz" in out.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded(signum):
    code = ("import signal, sys, time\n"
            f"signal.signal({int(signum)}, lambda *a: sys.exit(7))\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # a new session: no controlling terminal, as under a supervisor that signals our pid only
    process = subprocess.Popen([TRACETRAIN, "run", "--", sys.executable, "-c", code], env=env,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        started = time.monotonic()
        process.send_signal(signum)
        assert process.wait(timeout=20) == 7
        assert time.monotonic() - started < 10
    finally:
        process.kill()
        process.stdout.close()
