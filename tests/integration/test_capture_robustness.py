"""Capture never hurts the agent: a non-vLLM endpoint, capture switched off, the collector down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.test_capture_examples import (
    ANSWER, BIN, OPENAI_AGENT, TASK, agent_env, llm_calls, load_fake_server_module, tracetrain_run,
)
from tracetrain.instrumentation import semconv as sc

pytestmark = pytest.mark.slow


@pytest.fixture
def strict_server():
    server = load_fake_server_module().FakeVllmServer(port=0, openai_strict=True).start()
    yield server
    server.stop()


@pytest.fixture
def fake_server():
    server = load_fake_server_module().FakeVllmServer(port=0).start()
    yield server
    server.stop()


def _unavailable_reasons(rows: list[dict]) -> set[str]:
    return {json.loads(r["attributes"]).get(sc.TOKEN_IDS_UNAVAILABLE_REASON) for r in rows}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_non_vllm_endpoint_adds_nothing_and_says_so(collector, data_dir, strict_server, stream):
    service = f"strict-{int(stream)}"
    agent = [OPENAI_AGENT, *(["--stream"] if stream else []), TASK]
    out = tracetrain_run(collector, strict_server, agent, "--service-name", service)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ANSWER
    bodies = [r["body"] for r in strict_server.requests]
    # the first request asked, was refused (400), and was resent as the agent made it; then never again
    assert "return_token_ids" in bodies[0] and all("return_token_ids" not in b for b in bodies[1:])
    assert len(bodies) == 3
    rows = llm_calls(data_dir, service)
    assert len(rows) == 2
    assert all(r["prompt_token_ids"] is None and r["response_token_ids"] is None and r["response_logprobs"] is None
               for r in rows)
    assert _unavailable_reasons(rows) == {"rejected_by_endpoint"}
    assert all(r["output_messages"] for r in rows)  # the rest of the LLM span is intact


def test_capture_switched_off(collector, data_dir, fake_server):
    out = tracetrain_run(collector, fake_server, [OPENAI_AGENT, TASK], "--service-name", "capture-off",
                         TRACETRAIN_CAPTURE_TOKEN_IDS="false")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ANSWER
    assert len(fake_server.requests) == 2
    assert all("return_token_ids" not in r["body"] and "logprobs" not in r["body"] for r in fake_server.requests)
    rows = llm_calls(data_dir, "capture-off")
    assert len(rows) == 2 and all(r["response_token_ids"] is None for r in rows)
    assert _unavailable_reasons(rows) == {"capture_disabled"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_collector_down_the_agent_runs_unchanged(fake_server):
    plain = subprocess.run([sys.executable, OPENAI_AGENT, TASK], env=agent_env(fake_server), capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    command = [str(BIN / "tracetrain"), "run", "--collector", f"http://127.0.0.1:{_closed_port()}", "--",
               sys.executable, OPENAI_AGENT, TASK]
    started = time.monotonic()
    captured = subprocess.run(command, env=agent_env(fake_server, OTEL_EXPORTER_OTLP_TIMEOUT="2"),
                              capture_output=True, text=True, timeout=120)
    elapsed_s = time.monotonic() - started
    assert captured.returncode == 0, captured.stderr
    assert captured.stdout == plain.stdout == ANSWER + "\n"
    assert "spans_not_exported" in captured.stderr  # the loss is counted and said once
    assert elapsed_s < 60
