"""The rollout runner's own spans: each episode's root (or ``rollout``) span, rewards and failures.

For a Python callable agent the runner *is* the agent process, so it switches capture
on in-process exactly as ``tracetrain run`` does in a child: OTEL_* variables, then
OpenTelemetry's auto-instrumentation ``initialize()`` (the ``tracetrain`` distro and
configurator, every installed instrumentor: Traceloop's OpenAI spans and tracetrain's
token ids). The episode span it opens is the trace root, like
``tracetrain.instrumentation.episode()`` (the trainer may not import the
instrumentation package, so the span is built here from the same semconv keys).

For process agents the runner keeps a private TracerProvider exporting to the same
collector, so it never touches the process's global OpenTelemetry state.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from tracetrain.instrumentation import semconv as sc

SCOPE_NAME = "tracetrain.rollout"
DEFAULT_COLLECTOR = "http://127.0.0.1:4317"
ERROR_TYPE = "error.type"  # OTel semconv
PROCESS_EXIT_CODE = "process.exit.code"  # OTel semconv
REWARD_REASON = "tracetrain.reward.reason"


class _RewardWatcher(SpanProcessor):
    """Remembers rewards the agent emitted itself (``emit_reward``), by trace id."""

    def __init__(self) -> None:
        self.by_trace: dict[int, float] = {}
        self.lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        try:  # runs inside the agent's span.end(): never raise there
            value = (span.attributes or {}).get(sc.REWARD)
            scope = getattr(span.instrumentation_scope, "name", None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and scope != SCOPE_NAME:
                with self.lock:
                    self.by_trace[span.context.trace_id] = float(value)
        except Exception:  # noqa: BLE001, S110 - a missed own reward only means the grader runs
            pass


_watchers: "weakref.WeakKeyDictionary[TracerProvider, _RewardWatcher]" = weakref.WeakKeyDictionary()
_watchers_lock = threading.Lock()


def _watcher_of(provider: TracerProvider) -> _RewardWatcher:
    """One watcher per provider, however many rollouts run in the process (an online trainer runs hundreds)."""
    with _watchers_lock:
        watcher = _watchers.get(provider)
        if watcher is None:
            watcher = _watchers[provider] = _RewardWatcher()
            provider.add_span_processor(watcher)
        return watcher


def configure_in_process_capture(collector: str, protocol: str, service_name: str) -> TracerProvider:
    """The global SDK provider, set up like ``tracetrain run`` unless one is already configured.

    An existing SDK provider is kept as it is (its exporter, its instrumentors): the caller
    configured capture already. Mutates os.environ (OTEL_* for the SDK) on first use.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    os.environ.setdefault("OTEL_SERVICE_NAME", service_name)
    os.environ.setdefault("OTEL_PYTHON_DISTRO", "tracetrain")
    os.environ.setdefault("OTEL_PYTHON_CONFIGURATOR", "tracetrain")
    from opentelemetry.instrumentation.auto_instrumentation import initialize
    initialize()
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        raise RuntimeError("OpenTelemetry auto-instrumentation did not configure an SDK tracer provider "
                           "(is tracetrain installed, with its opentelemetry_configurator entry point?)")
    return current


def private_provider(collector: str, protocol: str, service_name: str) -> TracerProvider:
    """A provider of our own exporting to ``collector`` (the global one is left alone)."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        exporter = HttpExporter(endpoint=collector.rstrip("/") + "/v1/traces")
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        exporter = GrpcExporter(endpoint=collector, insecure=not collector.startswith("https://"))
    provider = TracerProvider(resource=Resource.create({sc.SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider


class RolloutTracing:
    """Opens, rewards and closes episode spans for the runner."""

    def __init__(self, collector: str | None, protocol: str, service_name: str, in_process: bool):
        self.collector = collector or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_COLLECTOR
        self.protocol = protocol
        self.service_name = service_name
        self.in_process = in_process
        if in_process:
            self.provider = configure_in_process_capture(self.collector, protocol, service_name)
            self.watcher = _watcher_of(self.provider)
        else:
            self.watcher = _RewardWatcher()  # sees nothing: process agents' spans are elsewhere
            self.provider = private_provider(self.collector, protocol, service_name)
        self.tracer = self.provider.get_tracer(SCOPE_NAME)

    def start_episode(self, spec: Any, agent_name: str | None, is_agent_root: bool) -> trace.Span:
        """The episode's span, a new trace root carrying its ids.

        In-process it is the agent's ``invoke_agent`` root (the agent's spans become its
        children); for a process agent it is a ``rollout`` span beside the agent's own trace.
        """
        attributes: dict[str, Any] = dict(spec.ids())
        if agent_name:
            attributes[sc.GEN_AI_AGENT_NAME] = agent_name
        if is_agent_root:
            attributes[sc.GEN_AI_OPERATION_NAME] = "invoke_agent"
            name = f"invoke_agent {agent_name}" if agent_name else "invoke_agent"
        else:
            name = "rollout"
        return self.tracer.start_span(name, context=otel_context.Context(), kind=trace.SpanKind.INTERNAL,
                                      attributes=attributes)

    def own_reward(self, span: trace.Span) -> float | None:
        """A reward the agent emitted itself in this episode's trace (in-process agents only)."""
        with self.watcher.lock:
            return self.watcher.by_trace.get(span.get_span_context().trace_id)

    def emit_reward(self, span: trace.Span, spec: Any, value: float, name: str | None,
                    reason: str | None = None) -> None:
        """A ``reward`` span, child of the episode span, with the episode's ids (as ``emit_reward`` makes)."""
        attributes: dict[str, Any] = {sc.REWARD: float(value), **spec.ids()}
        if name:
            attributes[sc.REWARD_NAME] = name
            attributes[sc.REWARD_SOURCE] = "tracetrain.rollout"
        if reason:
            attributes[REWARD_REASON] = reason
        self.tracer.start_span("reward", context=trace.set_span_in_context(span), attributes=attributes).end()

    def end_episode(self, span: trace.Span, status: str, error: str | None, exit_code: int | None) -> None:
        """End the episode span; a failed or timed-out run makes it an error span."""
        if exit_code is not None:
            span.set_attribute(PROCESS_EXIT_CODE, exit_code)
        if status != "ok":
            span.set_attribute(ERROR_TYPE, status)
            span.set_status(Status(StatusCode.ERROR, error or status))
        span.end()
        with self.watcher.lock:
            self.watcher.by_trace.pop(span.get_span_context().trace_id, None)

    def flush(self) -> None:
        """Deliver every span (in-process: flush only, the agent's provider stays up)."""
        self.provider.force_flush(30_000)
        if not self.in_process:
            self.provider.shutdown()
