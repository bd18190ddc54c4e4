"""What capture costs an agent per LLM call, against the fake vLLM server (printed with -s).

Also a script: ``python tests/integration/test_capture_overhead.py [CALLS]`` prints the tables
that docs/capture.md quotes. The agent side is the real OpenAI client and a real SDK
TracerProvider whose BatchSpanProcessor feeds an exporter that discards (export happens off
the agent's thread anyway; this measures what the agent's thread pays). Two transports:

* ``inprocess``: the fake server's response bodies (same code, same bytes) served by an
  in-memory httpx transport. No sockets, no second process: the difference between setups
  is the client-side CPU cost of capture, measurable to a few µs even on a busy machine.
* ``http``: the fake server in its own process on loopback: end to end, server work for the
  larger responses included, but as noisy as the machine.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from tracetrain.instrumentation.openai_capture import TracetrainOpenAIInstrumentor, forget_rejecting_endpoints

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something. " * 20}]
ASK_EXPLICITLY = {"logprobs": True, "extra_body": {"return_token_ids": True}}


class _DiscardingExporter(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def _start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "fake_vllm_server.py"), "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()  # "listening on http://127.0.0.1:PORT"
    return process, line.rsplit(" ", 1)[-1] + "/v1"


def _in_process_client(stream: bool) -> openai.OpenAI:
    """A client whose transport answers with the fake server's bodies, computed once per request shape."""
    import httpx2  # the openai client's HTTP library (openai >= 3 ships httpx2)

    spec = importlib.util.spec_from_file_location("fake_vllm_server", ROOT / "examples" / "fake_vllm_server.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    canned: dict[tuple, bytes] = {}

    def handler(request):
        import json

        body = json.loads(request.content)
        key = (bool(body.get("return_token_ids")), bool(body.get("logprobs")))
        if key not in canned:
            completion = fake.Completion(body, vllm=True)
            canned[key] = (b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in completion.chunks())
                           + b"data: [DONE]\n\n") if stream else json.dumps(completion.plain()).encode()
        content_type = "text/event-stream" if stream else "application/json"
        return httpx2.Response(200, content=canned[key], headers={"content-type": content_type})

    http_client = httpx2.Client(transport=httpx2.MockTransport(handler))
    return openai.OpenAI(base_url="http://fake-vllm.invalid/v1", api_key="EMPTY", max_retries=0,
                         http_client=http_client)


def _one_call_us(client: openai.OpenAI, stream: bool, request: dict, clock) -> float:
    start = clock()
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=stream, **request)
    if stream:
        for _chunk in response:
            pass
    return (clock() - start) * 1e6


SETUPS = {  # name: (instrumented, TRACETRAIN_CAPTURE_TOKEN_IDS, request)
    "uninstrumented, plain request": (False, "true", {}),
    "uninstrumented, ids+logprobs asked by the caller": (False, "true", ASK_EXPLICITLY),
    "tracetrain, capture off (span only)": (True, "false", {}),
    "tracetrain, capture on (adds the fields)": (True, "true", {}),
    "tracetrain, ids+logprobs asked by the caller": (True, "true", ASK_EXPLICITLY),
}


def measure(calls: int = 300, stream: bool = False, transport: str = "inprocess") -> dict[str, float]:
    """Median µs per call for each setup.

    Setups alternate call by call, so a change in machine load hits them all alike. In process,
    the clock is the agent thread's CPU time: time stolen by other processes does not count.
    """
    process, base_url = _start_server() if transport == "http" else (None, "")
    clock = time.perf_counter if process else time.thread_time
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DiscardingExporter()))
    instrumentor = TracetrainOpenAIInstrumentor()
    samples: dict[str, list[float]] = {name: [] for name in SETUPS}
    try:
        client = (openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) if process
                  else _in_process_client(stream))
        for _ in range(30):  # warm up the connection, the client and every code path
            for instrumented in (False, True):
                if instrumented:
                    instrumentor.instrument(tracer_provider=provider)
                _one_call_us(client, stream, {}, clock)
                if instrumented:
                    instrumentor.uninstrument()
        for _ in range(calls):
            for name, (instrumented, capture, request) in SETUPS.items():
                os.environ["TRACETRAIN_CAPTURE_TOKEN_IDS"] = capture
                if instrumented:
                    instrumentor.instrument(tracer_provider=provider)
                samples[name].append(_one_call_us(client, stream, request, clock))
                if instrumented:
                    instrumentor.uninstrument()
    finally:
        os.environ.pop("TRACETRAIN_CAPTURE_TOKEN_IDS", None)
        forget_rejecting_endpoints()
        provider.shutdown()
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(medians: dict[str, float], stream: bool, transport: str) -> str:
    base = medians["uninstrumented, plain request"]
    clock = "wall time" if transport == "http" else "agent-thread CPU time"
    lines = [f"{'streamed' if stream else 'non-streamed'} chat call, {transport}, median µs of {clock} per call "
             f"(difference to uninstrumented):"]
    lines += [f"  {name:50s} {value:9.0f}  ({value - base:+7.0f})" for name, value in medians.items()]
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_capture_overhead_per_call(stream):
    medians = measure(calls=300, stream=stream)
    print("\n" + report(medians, stream, "inprocess"))
    wrapper_only_us = (medians["tracetrain, ids+logprobs asked by the caller"]
                       - medians["uninstrumented, ids+logprobs asked by the caller"])
    assert wrapper_only_us < 5000  # generous: a shared CI machine; the printed figure is what matters


def main(argv: Sequence[str]) -> None:
    calls = int(argv[0]) if argv else 1000
    for transport in ("inprocess", "http"):
        for stream in (False, True):
            print(report(measure(calls, stream, transport), stream, transport))


if __name__ == "__main__":
    main(sys.argv[1:])
