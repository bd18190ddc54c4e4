"""Fixtures for the in-process capture tests: the fake vLLM server and an SDK with an in-memory exporter."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracetrain.instrumentation import drops, rewards
from tracetrain.instrumentation.openai_capture import TracetrainOpenAIInstrumentor, forget_rejecting_endpoints

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_server():
    server = load_example("fake_vllm_server").FakeVllmServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def strict_server():
    server = load_example("fake_vllm_server").FakeVllmServer(port=0, openai_strict=True).start()
    yield server
    server.stop()


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider, exporter
    tracer_provider.shutdown()


@pytest.fixture
def spans(provider, monkeypatch) -> Iterator[InMemorySpanExporter]:
    """tracetrain's instrumentor on a private provider; yields the exporter holding finished spans."""
    tracer_provider, exporter = provider
    for variable in ("TRACETRAIN_CAPTURE_TOKEN_IDS", "TRACETRAIN_POLICY_VERSION", "TRACETRAIN_EPISODE_ID",
                     "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(rewards, "_tracer_provider", tracer_provider)
    drops.reset_drop_counts()
    forget_rejecting_endpoints()
    instrumentor = TracetrainOpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    yield exporter
    instrumentor.uninstrument()
    forget_rejecting_endpoints()
    drops.reset_drop_counts()
