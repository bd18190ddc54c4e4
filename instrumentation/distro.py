"""OpenTelemetry distro and configurator: ``opentelemetry-instrument`` works with tracetrain alone.

``opentelemetry-instrument`` (and ``tracetrain run``, which uses the same
sitecustomize) loads one ``opentelemetry_distro`` and one
``opentelemetry_configurator`` entry point; without a configurator it exports
nothing (measured, shared/notes/stack-recheck.md §5), and ``opentelemetry-distro``
is not a tracetrain dependency. These two fill that role:

* ``TracetrainDistro`` sets defaults for the variables a user did not set: traces
  over OTLP/gRPC, no metrics or logs (the collector takes traces only), and message
  content on for Traceloop's and the contrib GenAI instrumentations;
* ``TracetrainConfigurator`` is the SDK's own ``_OTelSDKConfigurator`` (TracerProvider,
  resource, sampler, exporters, all from ``OTEL_*``), with each span exporter wrapped
  so spans that could not be delivered (collector down) are counted as drops.

``tracetrain run`` sets OTEL_PYTHON_DISTRO / OTEL_PYTHON_CONFIGURATOR to ``tracetrain``
so these are chosen even when ``opentelemetry-distro`` is installed too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.sdk import _configuration as sdk_configuration
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from tracetrain.instrumentation import env
from tracetrain.instrumentation.drops import record_drop

ENV_DEFAULTS: dict[str, str] = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    # The collector implements the trace service only: exporting metrics or logs
    # there would log an UNIMPLEMENTED error on every export interval.
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
    # Training needs the messages; both instrumentations default to recording none
    # (Traceloop records them unless told not to, the contrib ones only when asked).
    env.TRACELOOP_TRACE_CONTENT: "true",
    env.OTEL_GENAI_CAPTURE_MESSAGE_CONTENT: "SPAN_ONLY",
}


def apply_env_defaults() -> None:
    """Set every ENV_DEFAULTS variable the user left unset (a set one, even empty, wins)."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


class TracetrainDistro(BaseDistro):
    """The ``tracetrain`` distro: defaults for a trace-only, content-capturing setup."""

    def _configure(self, **kwargs: Any) -> None:
        apply_env_defaults()


class DropCountingSpanExporter(SpanExporter):
    """Delegates to an exporter and counts the spans it failed to deliver."""

    def __init__(self, exporter: SpanExporter):
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception as error:  # noqa: BLE001 - an exporter bug must not reach the agent
            record_drop("spans_not_exported", error, amount=len(spans))
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            record_drop("spans_not_exported (collector unreachable or refusing)", amount=len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _counting_batch_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    return BatchSpanProcessor(DropCountingSpanExporter(exporter))


class TracetrainConfigurator(sdk_configuration._OTelSDKConfigurator):  # noqa: SLF001 - the SDK says to subclass it
    """The SDK's env-driven configurator, with delivery failures counted."""

    def _configure(self, **kwargs: Any) -> None:
        apply_env_defaults()  # when another distro was chosen, still fill in what it left unset
        accepts = inspect.signature(sdk_configuration._initialize_components).parameters  # noqa: SLF001
        if "export_span_processor" in accepts:  # SDK >= 1.40; older ones keep their plain processor
            kwargs.setdefault("export_span_processor", _counting_batch_processor)
        super()._configure(**kwargs)
