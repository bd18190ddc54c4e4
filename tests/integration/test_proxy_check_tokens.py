"""Proxy-captured calls re-tokenize exactly: the messages the proxy stores render to the ids vLLM used."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.integration.test_proxy import QUESTION, TOOLS, _calls, _post, make_proxy  # noqa: F401 - fixture
from tracetrain.collector.cli import main

pytest.importorskip("transformers", reason="check-tokens needs the trainer extra: pip install -e '.[trainer]'")

from tests.integration.fake_upstream import FakeVllm, HFTokenizer, build_tiny_tokenizer  # noqa: E402


def test_agent_calls_through_the_proxy_pass_check_tokens(make_proxy, data_dir, tmp_path):  # noqa: F811
    model_dir = build_tiny_tokenizer(tmp_path / "tiny-model")
    with FakeVllm(tokenizer=HFTokenizer(model_dir)) as upstream:
        proxy = make_proxy(upstream.url)
        status, _, body = _post(proxy.url + "/v1/chat/completions",
                                {"model": "tiny-model", "messages": QUESTION, "tools": TOOLS})
        assert status == 200
        assistant = json.loads(body)["choices"][0]["message"]
        history = QUESTION + [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"],
                                          "content": "42"}]
        for stream in (False, True):
            status, _, _ = _post(proxy.url + "/v1/chat/completions",
                                 {"model": "tiny-model", "messages": history, "tools": TOOLS, "stream": stream})
            assert status == 200
        status, _, _ = _post(proxy.url + "/v1/completions", {"model": "tiny-model", "prompt": "What is 6 * 7?"})
        assert status == 200
        assert len(_calls(proxy, data_dir)) == 4
    result = CliRunner().invoke(main, ["check-tokens", "--data", str(data_dir), "--model", str(model_dir), "--all"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        "check-tokens: 4 calls, 4 match, 0 mismatch (prompts 4/4 match, responses 3/3 match, 1 checks skipped)")
