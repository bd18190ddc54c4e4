"""`tracetrain proxy --system-prompt-file`: the registered prompt replaces or is inserted as the system
message of chat requests, re-read when the file changes (an APO publish), and the span records it."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from tracetrain.collector.proxy import LLMProxy, ProxyConfig
from tracetrain.collector.proxy_prompt import (
    SystemPromptFile,
    read_prompt_file,
    with_system_prompt,
)
from tracetrain.collector.reader import query
from tracetrain.trainer import prompt_store
from tracetrain.trainer.apo import prompt_environment

from tests.integration.fake_upstream import FakeVllm


def _chat(proxy: LLMProxy, messages: list[dict], episode: str) -> dict:
    body = json.dumps({"model": "tiny-model", "messages": messages}).encode()
    request = urllib.request.Request(proxy.url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json", "x-tracetrain-episode-id": episode})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def upstream():
    fake = FakeVllm().start()
    yield fake
    fake.stop()


def test_proxy_puts_the_current_published_prompt_into_chat_requests(collector, data_dir, upstream, tmp_path):
    resources = tmp_path / "resources"
    prompt_store.publish(resources, "calc", "You are v1.")
    current = resources / "prompts" / "calc" / "current.json"
    proxy = LLMProxy(ProxyConfig(upstream_url=upstream.url, listen="127.0.0.1:0",
                                 collector_url=f"http://127.0.0.1:{collector.grpc_port}",
                                 system_prompt_file=str(current))).start()
    try:
        _chat(proxy, [{"role": "system", "content": "old prompt"}, {"role": "user", "content": "6*7?"}], "ep-a")
        prompt_store.publish(resources, "calc", "You are v2. Think step by step.")  # APO publishes a new version
        _chat(proxy, [{"role": "user", "content": "2+2?"}], "ep-b")
        assert proxy.flush()
    finally:
        proxy.stop()
    sent = [call["request"]["messages"] for call in upstream.calls]
    assert sent[0] == [{"role": "system", "content": "You are v1."}, {"role": "user", "content": "6*7?"}]
    assert sent[1] == [{"role": "system", "content": "You are v2. Think step by step."},
                       {"role": "user", "content": "2+2?"}]
    rows = query(data_dir, "SELECT episode_id, input_messages FROM llm_calls ORDER BY start_time_unix_nano").to_pylist()
    recorded = {r["episode_id"]: json.loads(r["input_messages"])[0] for r in rows}
    assert recorded["ep-a"]["parts"][0]["content"] == "You are v1."  # the span shows what the model saw
    assert recorded["ep-b"]["parts"][0]["content"] == "You are v2. Think step by step."
    # (a): an agent that reads $SYSTEM_PROMPT gets the same current version
    assert prompt_environment(resources, "calc", base={})["SYSTEM_PROMPT"] == "You are v2. Think step by step."


def test_prompt_file_forms_and_failures(tmp_path, caplog):
    text = tmp_path / "p.txt"
    text.write_text("Plain prompt.\n")
    assert read_prompt_file(text) == "Plain prompt."
    bad = tmp_path / "p.json"
    bad.write_text('{"version": 3}')
    with pytest.raises(ValueError, match='without a "prompt"'):
        read_prompt_file(bad)
    watched = SystemPromptFile(tmp_path / "missing.txt")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert watched.apply(body) is body  # nothing usable yet: unchanged
    (tmp_path / "missing.txt").write_text("Now here.")
    assert watched.apply(body)["messages"][0] == {"role": "system", "content": "Now here."}
    os.remove(tmp_path / "missing.txt")
    assert watched.current() == "Now here."  # the last good prompt stays
    assert sum("cannot read --system-prompt-file" in r.message for r in caplog.records) == 2
    assert with_system_prompt({"prompt": "x"}, "p") == {"prompt": "x"}  # not a chat body
