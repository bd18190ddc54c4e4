"""`tracetrain proxy` between a client and a vLLM-like upstream, spans into a real collector."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.fake_upstream import FakeVllm
from tracetrain.collector.proxy import LLMProxy, ProxyConfig, upstream_base
from tracetrain.collector.reader import query
from tracetrain.instrumentation import semconv as sc

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
QUESTION = [{"role": "system", "content": "Use the calc tool."}, {"role": "user", "content": "What is 6 * 7? héllo ✓"}]


@pytest.fixture
def upstream():
    fake = FakeVllm(policy_version=7).start()
    yield fake
    fake.stop()


@pytest.fixture
def make_proxy(collector):
    proxies = []

    def make(upstream_url: str) -> LLMProxy:
        proxy = LLMProxy(ProxyConfig(upstream_url=upstream_url, listen="127.0.0.1:0",
                                     collector_url=f"http://127.0.0.1:{collector.grpc_port}")).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy, upstream) -> LLMProxy:
    return make_proxy(upstream.url + "/v1")  # an OpenAI base_url works as the upstream too


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def _calls(proxy: LLMProxy, data_dir: Path, where: str = "TRUE") -> list[dict]:
    assert proxy.flush()
    return query(data_dir, f"SELECT * FROM llm_calls WHERE {where} ORDER BY start_time_unix_nano, span_id").to_pylist()


def _spans(data_dir: Path, where: str) -> list[dict]:
    return query(data_dir, f"SELECT * FROM spans WHERE {where}").to_pylist()


def test_chat_call_records_exact_ids_and_continues_the_trace(proxy, upstream, data_dir):
    traceparent, trace_id, parent = _traceparent()
    status, headers, body = _post(proxy.url + "/v1/chat/completions", {
        "model": "tiny-model", "messages": QUESTION, "tools": TOOLS, "temperature": 0.5, "max_tokens": 64,
    }, {"traceparent": traceparent, "baggage": "tracetrain.episode.id=ep-42,other=x",
        "x-tracetrain-task-id": "task-mul"})
    assert status == 200 and headers["x-tracetrain-policy-version"] == "7"
    sent = upstream.calls[0]
    # asked for ids and logprobs on the caller's behalf; the answer comes back unchanged, extras included
    assert sent["request"]["return_token_ids"] is True and sent["request"]["logprobs"] is True
    response = json.loads(body)
    assert response["prompt_token_ids"] == sent["prompt_token_ids"]
    assert response["choices"][0]["token_ids"] == sent["choices"][0]["token_ids"]
    [call] = _calls(proxy, data_dir)
    assert call["trace_id"] == trace_id and call["parent_span_id"] == parent
    # the upstream saw the proxy's span as its parent (vLLM's llm_request span joins the trace)
    assert sent["headers"]["traceparent"] == f"00-{trace_id}-{call['span_id']}-01"
    assert "tracetrain.episode.id=ep-42" in sent["headers"]["baggage"]
    assert call["prompt_token_ids"] == sent["prompt_token_ids"]
    assert call["response_token_ids"] == sent["choices"][0]["token_ids"]
    assert call["response_logprobs"] == sent["choices"][0]["logprobs"]
    assert (call["episode_id"], call["task_id"], call["policy_version"]) == ("ep-42", "task-mul", 7)
    assert (call["operation"], call["provider"], call["model"], call["name"]) == (
        "chat", "vllm", "tiny-model", "chat tiny-model")
    assert call["input_tokens"] == len(sent["prompt_token_ids"])
    assert call["output_tokens"] == len(sent["choices"][0]["token_ids"])
    assert json.loads(call["input_messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Use the calc tool."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 6 * 7? héllo ✓"}]}]
    assert json.loads(call["output_messages"]) == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
        {"type": "tool_call", "id": "call-0", "name": "calc", "arguments": {"expression": "6*7"}}]}]
    attributes = json.loads(call["attributes"])
    assert attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert attributes["gen_ai.request.temperature"] == 0.5 and attributes["gen_ai.request.max_tokens"] == 64
    assert json.loads(attributes["gen_ai.tool.definitions"]) == [
        {"type": "function", "name": "calc", "parameters": {"type": "object"}}]
    assert call["status_code"] == 0 and call["response_id"] == response["id"]


def test_caller_choices_win(proxy, upstream, data_dir):
    status, _, body = _post(proxy.url + "/v1/chat/completions", {
        "model": "tiny-model", "messages": QUESTION, "logprobs": False})
    assert status == 200 and json.loads(body)["choices"][0]["logprobs"] is None
    assert upstream.calls[-1]["request"]["logprobs"] is False
    status, _, body = _post(proxy.url + "/v1/chat/completions", {
        "model": "tiny-model", "messages": QUESTION, "return_token_ids": False})
    assert status == 200 and "prompt_token_ids" not in json.loads(body)
    first, second = _calls(proxy, data_dir)
    assert first["response_token_ids"] == upstream.calls[0]["choices"][0]["token_ids"]
    assert first["response_logprobs"] is None  # never invented
    assert second["prompt_token_ids"] is None and second["response_token_ids"] is None
    assert json.loads(second["attributes"])[sc.TOKEN_IDS_UNAVAILABLE_REASON] == "capture_disabled"


def _read_event(response: http.client.HTTPResponse) -> bytes:
    lines = []
    while True:
        line = response.readline()
        assert line, "stream ended early"
        lines.append(line)
        if line == b"\n":
            return b"".join(lines)


def _stream(proxy: LLMProxy, body: dict, headers: dict | None = None):
    host, port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    return connection, connection.getresponse()


def test_streaming_is_relayed_chunk_by_chunk_unchanged(make_proxy, collector, data_dir):
    release = threading.Event()  # the upstream holds the stream after its first chunk until this is set
    with FakeVllm(release=release, policy_version=2) as upstream:
        proxy = make_proxy(upstream.url)
        traceparent, trace_id, parent = _traceparent()
        connection, response = _stream(proxy, {"model": "tiny-model", "messages": QUESTION, "stream": True},
                                       {"traceparent": traceparent})
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        first = _read_event(response)  # would time out if the proxy buffered the stream
        assert upstream.stream_finished_at == [] and first.startswith(b"data: ")
        first_at = time.monotonic()
        release.set()
        body = first + response.read()
        connection.close()
        assert first_at < upstream.stream_finished_at[0]
        assert body == bytes(upstream.stream_bytes[0])  # every byte, in order, unchanged
        [call] = _calls(proxy, data_dir)
    sent = upstream.calls[0]
    assert sent["request"]["stream"] is True and sent["request"]["return_token_ids"] is True
    assert (call["trace_id"], call["parent_span_id"]) == (trace_id, parent)
    assert call["prompt_token_ids"] == sent["prompt_token_ids"]
    assert call["response_token_ids"] == sent["choices"][0]["token_ids"]
    assert call["response_logprobs"] == sent["choices"][0]["logprobs"]
    assert call["policy_version"] == 2 and call["output_tokens"] == len(sent["choices"][0]["token_ids"])
    assert json.loads(call["output_messages"])[0]["parts"] == [
        {"type": "text", "content": "Echo: What is 6 * 7? héllo ✓"}]


def test_n_choices_one_span_choice_zero_in_columns(proxy, upstream, data_dir):
    for stream in (False, True):
        status, _, _ = _post(proxy.url + "/v1/chat/completions", {
            "model": "tiny-model", "messages": QUESTION, "n": 3, "stream": stream})
        assert status == 200
    calls = _calls(proxy, data_dir)
    assert len(calls) == 2  # one span per call, as the in-process capture does
    for call, sent in zip(calls, upstream.calls):
        attributes = json.loads(call["attributes"])
        assert call["prompt_token_ids"] == sent["prompt_token_ids"]
        assert call["response_token_ids"] == sent["choices"][0]["token_ids"]
        assert call["response_logprobs"] == sent["choices"][0]["logprobs"]
        assert attributes[sc.OUTPUT_CHOICE_COUNT] == 3 and attributes[sc.GEN_AI_REQUEST_CHOICE_COUNT] == 3
        for i in (1, 2):
            assert attributes[sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=i)] == sent["choices"][i]["token_ids"]
            assert attributes[sc.OUTPUT_CHOICE_LOGPROBS_TEMPLATE.format(index=i)] == sent["choices"][i]["logprobs"]
        outputs = json.loads(call["output_messages"])
        assert [o["parts"][0]["content"] for o in outputs] == [c["text"] for c in sent["choices"]]


def test_completions_one_span_per_prompt(proxy, upstream, data_dir):
    traceparent, trace_id, parent = _traceparent()
    status, _, body = _post(proxy.url + "/v1/completions", {
        "model": "tiny-model", "prompt": ["2 + 2 =", "6 * 7 ="], "n": 2, "max_tokens": 8},
        {"traceparent": traceparent})
    assert status == 200 and len(json.loads(body)["choices"]) == 4
    sent = upstream.calls[0]
    assert sent["request"]["logprobs"] == 1 and sent["request"]["return_token_ids"] is True
    calls = _calls(proxy, data_dir)  # siblings that start together: put them in prompt order
    calls.sort(key=lambda c: sent["prompt_token_ids"].index(c["prompt_token_ids"]))
    assert [c["prompt_token_ids"] for c in calls] == sent["prompt_token_ids"]
    assert [json.loads(c["input_messages"])[0]["parts"][0]["content"] for c in calls] == ["2 + 2 =", "6 * 7 ="]
    assert [c["response_token_ids"] for c in calls] == [sent["choices"][0]["token_ids"],
                                                        sent["choices"][2]["token_ids"]]
    assert [c["response_logprobs"] for c in calls] == [sent["choices"][0]["logprobs"], sent["choices"][2]["logprobs"]]
    second_choice = json.loads(calls[1]["attributes"])[sc.OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE.format(index=1)]
    assert second_choice == sent["choices"][3]["token_ids"]
    assert all(c["trace_id"] == trace_id and c["parent_span_id"] == parent for c in calls)
    assert all(c["operation"] == "text_completion" for c in calls)


def test_streamed_completion(proxy, upstream, data_dir):
    status, _, body = _post(proxy.url + "/v1/completions", {"model": "tiny-model", "prompt": "6 * 7 =",
                                                            "stream": True})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    [call] = _calls(proxy, data_dir)
    sent = upstream.calls[0]
    assert call["prompt_token_ids"] == sent["prompt_token_ids"][0]
    assert call["response_token_ids"] == sent["choices"][0]["token_ids"]
    assert call["response_logprobs"] == sent["choices"][0]["logprobs"]


def test_upstream_errors_pass_through(proxy, upstream, data_dir):
    status, _, body = _post(proxy.url + "/v1/chat/completions", {"model": "missing-model", "messages": QUESTION})
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    status, _, body = _post(proxy.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["message"] == "invalid JSON"  # relayed as sent
    [call] = _calls(proxy, data_dir)  # the malformed body was relayed, not captured
    attributes = json.loads(call["attributes"])
    assert call["status_code"] == 2 and attributes["error.type"] == "404"
    assert "does not exist" in _spans(data_dir, f"span_id = '{call['span_id']}'")[0]["status_message"]


def test_transparent_paths(proxy, upstream, data_dir):
    status, _, body = _post(proxy.url + "/v1/models?x=1", b"")  # POST: the upstream decides
    assert status == 405
    with urllib.request.urlopen(proxy.url + "/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny-model"
    status, _, _ = _post(proxy.url + "/v1/embeddings", {"input": "x"})
    assert status == 404
    assert _calls(proxy, data_dir) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_upstream_down_gives_502_and_the_proxy_keeps_serving(make_proxy, upstream, data_dir):
    dead = make_proxy(f"http://127.0.0.1:{_free_port()}")
    for _ in range(3):
        status, _, body = _post(dead.url + "/v1/chat/completions", {"model": "tiny-model", "messages": QUESTION})
        assert status == 502 and json.loads(body)["error"]["type"] == "upstream_unreachable"
    status, _, _ = _post(dead.url + "/v1/models", b"")
    assert status == 502
    calls = _calls(dead, data_dir)
    assert len(calls) == 3 and all(c["status_code"] == 2 for c in calls)
    live = make_proxy(upstream.url)
    assert _post(live.url + "/v1/chat/completions", {"model": "tiny-model", "messages": QUESTION})[0] == 200
    upstream.stop()  # the upstream dies while the proxy runs
    status, _, body = _post(live.url + "/v1/chat/completions", {"model": "tiny-model", "messages": QUESTION})
    assert status == 502 and "unreachable" in json.loads(body)["error"]["message"]


def test_client_disconnect_mid_stream(make_proxy, data_dir):
    release = threading.Event()
    with FakeVllm(release=release, chunk_delay_s=0.01) as upstream:
        proxy = make_proxy(upstream.url)
        connection, response = _stream(proxy, {"model": "tiny-model", "messages": QUESTION, "stream": True})
        _read_event(response)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        release.set()
        deadline = time.monotonic() + 10
        while not _spans_flushed(proxy, data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        [call] = _calls(proxy, data_dir)
        assert call["status_code"] == 2
        assert _spans(data_dir, f"span_id = '{call['span_id']}'")[0]["status_message"] == "client disconnected"
        # and it still serves
        assert _post(proxy.url + "/v1/chat/completions", {"model": "tiny-model", "messages": QUESTION})[0] == 200


def _spans_flushed(proxy: LLMProxy, data_dir: Path) -> bool:
    return bool(_calls(proxy, data_dir))


def test_openai_sdk_through_the_proxy(proxy, upstream, data_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny-model", messages=QUESTION)
    assert reply.choices[0].message.content == "Echo: What is 6 * 7? héllo ✓"
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny-model", messages=QUESTION, stream=True) if chunk.choices]
    assert "".join(pieces) == reply.choices[0].message.content
    assert [c["response_token_ids"] for c in _calls(proxy, data_dir)] == [
        sent["choices"][0]["token_ids"] for sent in upstream.calls]


def test_upstream_base():
    assert upstream_base("http://h:8000/v1/") == upstream_base("http://h:8000") == "http://h:8000"
    assert upstream_base("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert upstream_base("https://h/prefix/v1") == "https://h/prefix"
    with pytest.raises(ValueError):
        upstream_base("ftp://h")


def test_cli_subprocess_flushes_on_sigterm(collector, upstream, data_dir):
    command = [sys.executable, "-m", "tracetrain.collector", "proxy", "--upstream", upstream.url,
               "--listen", "127.0.0.1:0", "--collector", f"http://127.0.0.1:{collector.grpc_port}",
               "--service-name", "proxy-under-test", "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split(" ")[0]
        assert _post(url + "/v1/chat/completions", {"model": "tiny-model", "messages": QUESTION})[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()
    rows = query(data_dir, "SELECT service_name, response_token_ids FROM llm_calls").to_pylist()
    expected_ids = upstream.calls[0]["choices"][0]["token_ids"]
    assert rows == [{"service_name": "proxy-under-test", "response_token_ids": expected_ids}]


def test_concurrent_calls_each_get_their_own_span(proxy, upstream, data_dir):
    from concurrent.futures import ThreadPoolExecutor

    def call(i: int) -> tuple[int, str]:
        traceparent, trace_id, _ = _traceparent()
        body = {"model": "tiny-model", "messages": [{"role": "user", "content": f"call {i}"}], "stream": i % 2 == 0}
        return _post(proxy.url + "/v1/chat/completions", body, {"traceparent": traceparent})[0], trace_id

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(48)))
    assert all(status == 200 for status, _ in results)
    calls = {c["trace_id"]: c for c in _calls(proxy, data_dir)}
    assert set(calls) == {trace_id for _, trace_id in results}
    sent = {json.dumps(s["request"]["messages"]): s for s in upstream.calls}
    for call_row in calls.values():
        expected = sent[json.dumps([{"role": "user", "content": json.loads(call_row["input_messages"])[0]["parts"][0]
                                     ["content"]}])]
        assert call_row["response_token_ids"] == expected["choices"][0]["token_ids"]
        assert call_row["prompt_token_ids"] == expected["prompt_token_ids"]


def test_taken_port_is_a_clear_error(proxy, upstream):
    port = proxy.url.rsplit(":", 1)[1]
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
        LLMProxy(ProxyConfig(upstream_url=upstream.url, listen=f"127.0.0.1:{port}")).start()
