"""The real vLLM server (.venv-serve) on the tiny model: token ids, logprobs, pushes, policy versions.

Skipped only when .venv-serve is missing outside CI; with CI=true a missing
serving venv is a failure (`make serve-env` builds it).
"""

import json

import urllib.request

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tracetrain.trainer import logprob_check, serving, weight_push  # noqa: E402
from tests.integration.vllm_fixtures import model_dir, server  # noqa: F401 - fixtures

TOL = 1e-4  # fp32 serving vs the trainer's fp32 forward pass


@pytest.fixture(scope="module")
def pusher(server, model_dir, tmp_path_factory):
    return weight_push.WeightPusher(server.url, server.state_file, str(tmp_path_factory.mktemp("push")),
                                    base_model_dir=model_dir)


def _chat(server, model, stream=False, n=1, max_tokens=12, seed=0, messages=None):
    body = {"model": model, "messages": messages or [{"role": "user", "content": "What is 37*48?"}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "n": n, "logprobs": True,
            "return_token_ids": True, "ignore_eos": True}
    if not stream:
        status, data, headers = serving.http_json(server.url + "/v1/chat/completions", body, timeout=120)
        assert status == 200, data
        return data, {k.lower(): v for k, v in headers.items()}
    body.update(stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=120) as r:
        headers = {k.lower(): v for k, v in r.headers.items()}
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks, headers


def _agree(server, model, model_dir, **kw):
    a = logprob_check.check_agreement(server.url, model, model_dir, **kw)
    print(f"logprob agreement {model} {kw}: {a.as_dict()}")
    assert a.n_tokens > 0 and a.max_abs <= TOL, a.as_dict()
    return a


def test_plain_chat_token_ids_and_logprobs(server):
    data, headers = _chat(server, server.served_name)
    ch = data["choices"][0]
    assert len(data["prompt_token_ids"]) > 0
    assert len(ch["token_ids"]) == 12 == len(ch["logprobs"]["content"])
    assert all(c["logprob"] <= 0 for c in ch["logprobs"]["content"])
    assert headers["x-tracetrain-policy-version"] == "0"


def test_streaming_equals_plain(server):
    data, _ = _chat(server, server.served_name, seed=3)
    chunks, headers = _chat(server, server.served_name, seed=3, stream=True)
    ids, lps, prompt_ids = [], [], None
    for c in chunks:
        prompt_ids = prompt_ids or c.get("prompt_token_ids")
        for ch in c.get("choices", []):
            ids += ch.get("token_ids") or []
            lps += [x["logprob"] for x in ((ch.get("logprobs") or {}).get("content") or [])]
    assert prompt_ids == data["prompt_token_ids"]
    assert ids == data["choices"][0]["token_ids"]
    assert lps == pytest.approx([x["logprob"] for x in data["choices"][0]["logprobs"]["content"]], abs=1e-6)
    assert headers["x-tracetrain-policy-version"] == "0"


def test_n_greater_than_one(server):
    data, _ = _chat(server, server.served_name, n=3, seed=5)
    assert len(data["choices"]) == 3
    for ch in data["choices"]:
        assert len(ch["token_ids"]) == 12 == len(ch["logprobs"]["content"])
    assert len({tuple(ch["token_ids"]) for ch in data["choices"]}) > 1


def test_base_logprobs_agree(server, model_dir):
    _agree(server, server.served_name, model_dir)


def test_lora_push_changes_outputs_and_version(server, pusher, model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    before, _ = _chat(server, server.served_name, seed=7, max_tokens=16)
    torch.manual_seed(1)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                   init_lora_weights=False))
    v0 = pusher.version
    r1 = pusher.push_lora(pm)
    assert r1.version == v0 + 1 and r1.model_name == "policy"
    after, headers = _chat(server, "policy", seed=7, max_tokens=16)
    print("base ids", before["choices"][0]["token_ids"], "lora ids", after["choices"][0]["token_ids"])
    assert after["choices"][0]["token_ids"] != before["choices"][0]["token_ids"]
    assert headers["x-tracetrain-policy-version"] == str(r1.version)
    _agree(server, "policy", model_dir, adapter=r1.path)
    # a second adapter version, loaded in place from a new folder
    torch.manual_seed(2)
    pm2 = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    r2 = pusher.push_lora(pm2)
    assert r2.version == r1.version + 1 and r2.path != r1.path
    _agree(server, "policy", model_dir, adapter=r2.path)


def test_failed_lora_push_is_reported_and_not_applied(server, pusher, model_dir, tmp_path):
    v = pusher.version
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    pusher.retries = 2
    with pytest.raises(weight_push.PushError):
        pusher.push_lora(str(bad))
    assert pusher.version == v
    state = json.loads(open(server.state_file).read())
    assert state["pending"] is None
    _, headers = _chat(server, "policy")
    assert headers["x-tracetrain-policy-version"] == str(v)


def test_full_push_changes_outputs_and_version(server, pusher, model_dir):
    from transformers import AutoModelForCausalLM
    before, _ = _chat(server, server.served_name, seed=11, max_tokens=16)
    torch.manual_seed(3)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    v0 = pusher.version
    r = pusher.push_full(sd)
    assert r.version == v0 + 1
    after, headers = _chat(server, server.served_name, seed=11, max_tokens=16)
    assert after["choices"][0]["token_ids"] != before["choices"][0]["token_ids"]
    assert headers["x-tracetrain-policy-version"] == str(r.version)
    _agree(server, server.served_name, model_dir, full_weights=r.path)
    # a long repeated prompt would hit the prefix cache: the push reset it
    long_msgs = [{"role": "user", "content": "word " * 200}]
    _chat(server, server.served_name, messages=long_msgs, max_tokens=2)
    r2 = pusher.push_full(model_dir)  # back to the original weights, from a folder
    data, _ = _chat(server, server.served_name, messages=long_msgs, max_tokens=2)
    assert data["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) == 0
    _agree(server, server.served_name, model_dir, full_weights=r2.path)


def test_straddling_request_is_marked_ambiguous(server, pusher):
    v = pusher.version
    pusher._set_state(v, v + 1)  # what a push in progress looks like
    try:
        _, headers = _chat(server, server.served_name)
        assert "x-tracetrain-policy-version" not in headers
        assert headers["x-tracetrain-policy-version-ambiguous"] == f"{v}-{v + 1}"
    finally:
        pusher._set_state(v, None)
    _, headers = _chat(server, server.served_name)
    assert headers["x-tracetrain-policy-version"] == str(v)


def test_failed_full_push_is_refused(server, pusher, model_dir):
    """A checkpoint that does not fit the model: refused before the server sees it, version unchanged."""
    from transformers import AutoModelForCausalLM
    v = pusher.version
    good_before, _ = _chat(server, server.served_name, seed=13)
    sd = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 3)  # wrong shape
    pusher.retries = 1
    with pytest.raises(weight_push.PushError) as err:
        pusher.push_full(sd)
    print("failed full push:", str(err.value)[:300])
    assert "does not match the served model" in str(err.value)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.full((256, 128), float("nan"))
    with pytest.raises(weight_push.PushError, match="NaN"):
        pusher.push_full(sd)
    assert pusher.version == v
    after, headers = _chat(server, server.served_name, seed=13)
    assert headers["x-tracetrain-policy-version"] == str(v)
    assert after["choices"][0]["token_ids"] == good_before["choices"][0]["token_ids"]
    _agree(server, server.served_name, model_dir, full_weights=pusher.last_good_full)


def test_pushes_during_traffic_never_mislabel(server, pusher, model_dir):
    """Requests run while full pushes alternate two weight sets: every answer labelled N has
    exactly version N's logprobs; straddlers are labelled ambiguous."""
    import threading

    from transformers import AutoModelForCausalLM
    weights = {pusher.version: pusher.last_good_full or model_dir}
    torch.manual_seed(5)
    perturbed = {k: v + 0.1 * torch.randn_like(v)
                 for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    results, stop = [], threading.Event()

    def traffic(tid):
        i = 0
        while not stop.is_set():
            data, headers = _chat(server, server.served_name, seed=1000 * tid + i, max_tokens=8)
            results.append((data, headers))
            i += 1

    threads = [threading.Thread(target=traffic, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        import time
        for k in range(4):
            time.sleep(0.7)  # stable windows between pushes, so some answers are labelled
            r = pusher.push_full(perturbed if k % 2 == 0 else model_dir)
            weights[r.version] = r.path
        time.sleep(0.7)
    finally:
        stop.set()
        for t in threads:
            t.join()
    refs = {v: logprob_check.load_reference(model_dir, full_weights=p) for v, p in weights.items()}
    labelled = ambiguous = 0
    worst = 0.0
    for data, headers in results:
        if "x-tracetrain-policy-version" not in headers:
            assert "x-tracetrain-policy-version-ambiguous" in headers
            ambiguous += 1
            continue
        v = int(headers["x-tracetrain-policy-version"])
        ch = data["choices"][0]
        ref = logprob_check.reference_logprobs(refs[v], data["prompt_token_ids"], ch["token_ids"])
        d = max(abs(a["logprob"] - b) for a, b in zip(ch["logprobs"]["content"], ref))
        worst = max(worst, d)
        assert d <= TOL, (v, d)
        labelled += 1
    print(f"during pushes: {labelled} labelled (worst diff {worst:.1e}), {ambiguous} ambiguous")
    assert labelled > 0
    assert len({h.get("x-tracetrain-policy-version") for _, h in results} - {None}) >= 2
