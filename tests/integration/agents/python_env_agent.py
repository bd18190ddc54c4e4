"""A tiny agent that exports spans configured ONLY by the standard OTEL_* env vars.

It builds its exporter the way `opentelemetry-instrument` would: from
OTEL_EXPORTER_OTLP_PROTOCOL (grpc | http/protobuf), with endpoint, headers,
timeout and compression all read by the SDK from the environment.
Prints one JSON line: {"trace_id": ..., "span_ids": [...]}; exits 1 if export failed.
"""

import json
import os
import sys

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter


class CheckedExporter(OTLPSpanExporter):
    failures = 0

    def export(self, spans):
        result = super().export(spans)
        if result is not SpanExportResult.SUCCESS:
            CheckedExporter.failures += 1
        return result


provider = TracerProvider(resource=Resource.create())  # service name from OTEL_SERVICE_NAME
provider.add_span_processor(SimpleSpanProcessor(CheckedExporter()))
tracer = provider.get_tracer("python-env-agent", "1.0")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
span_ids = []
with tracer.start_as_current_span("agent", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "py-agent",
        "tracetrain.episode.id": "ep-python", "tracetrain.task.id": "task-7"}) as root:
    trace_id = format(root.get_span_context().trace_id, "032x")
    span_ids.append(format(root.get_span_context().span_id, "016x"))
    for i in range(n):
        with tracer.start_as_current_span("chat tiny-model", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny-model",
                "gen_ai.usage.input_tokens": 10 + i, "gen_ai.usage.output_tokens": 3,
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [
                    {"type": "text", "content": f"héllo ✓ {i}"}]}], ensure_ascii=False),
                "tracetrain.output.token_ids": [1, 2, 3 + i],
                "tracetrain.output.logprobs": [-0.5, -0.25, -0.125],
                "tracetrain.policy.version": 4}) as span:
            span.add_event("tool.done", {"tool": "calc"})
            span_ids.append(format(span.get_span_context().span_id, "016x"))
    with tracer.start_as_current_span("reward", attributes={"tracetrain.reward": 1.0}) as span:
        span_ids.append(format(span.get_span_context().span_id, "016x"))
provider.shutdown()
print(json.dumps({"trace_id": trace_id, "span_ids": span_ids}))
sys.exit(1 if CheckedExporter.failures else 0)
