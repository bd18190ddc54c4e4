"""Write agent episodes into a real collector through the real OTel SDK exporter (OTLP/gRPC).

``EpisodeWriter(grpc_port)`` owns a TracerProvider with a synchronous exporter, so a
``record`` call returns once the collector acknowledged (made durable) the spans.
"""

from __future__ import annotations

import json

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode


def _messages(*pairs: tuple[str, str]) -> str:
    return json.dumps([{"role": role, "parts": [{"type": "text", "content": text}]} for role, text in pairs])


class EpisodeWriter:
    def __init__(self, grpc_port: int, service: str = "toy-agent") -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=f"http://127.0.0.1:{grpc_port}", insecure=True)))
        self.tracer = self.provider.get_tracer("toy-agent")

    def record(self, episode_id: str, task_id: str, system_prompt: str | None, question: str, answer: str,
               tool_errors: int = 0, tool_ok: int = 0, reward: float | None = None,
               expected: str | None = None) -> None:
        """One episode: root invoke_agent span, a chat call, tool spans, and an inline reward span."""
        root_attrs = {"gen_ai.operation.name": "invoke_agent", "tracetrain.episode.id": episode_id,
                      "tracetrain.task.id": task_id, "gen_ai.agent.name": "toy"}
        if expected is not None:
            root_attrs["task.expected"] = expected
        with self.tracer.start_as_current_span("invoke_agent toy", attributes=root_attrs):
            for i in range(tool_ok + tool_errors):
                with self.tracer.start_as_current_span("execute_tool calc", attributes={
                        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calc"}) as tool:
                    if i >= tool_ok:
                        tool.set_attribute("error.type", "ValueError")
                        tool.set_status(Status(StatusCode.ERROR, "bad expression"))
            pairs = ([("system", system_prompt)] if system_prompt is not None else []) + [("user", question)]
            with self.tracer.start_as_current_span("chat toy-model", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": "toy-model",
                    "gen_ai.input.messages": _messages(*pairs),
                    "gen_ai.output.messages": _messages(("assistant", answer))}):
                pass
            if reward is not None:
                with self.tracer.start_as_current_span("reward", attributes={
                        "tracetrain.reward": reward, "tracetrain.reward.name": "inline"}):
                    pass

    def close(self) -> None:
        self.provider.shutdown()
