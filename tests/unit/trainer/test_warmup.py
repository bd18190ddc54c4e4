"""tracetrain model warmup: a short masked SFT lowers held-out loss, deterministic for a seed."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner
from safetensors.torch import load_file
from tracetrain.trainer import cli_serving, model_init, tool_eval, warmup

STEPS = 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_init.init_model(tmp_path_factory.mktemp("m") / "tiny", size="tiny", seed=0)


def test_make_examples_seeded_and_masked(base):
    from transformers import AutoTokenizer
    a, b = warmup.make_examples("calc", 8, 0), warmup.make_examples("calc", 8, 0)
    assert a == b and a != warmup.make_examples("calc", 8, 1)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    ids, mask = warmup.encode_example(tok, a[0]["messages"])
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned.startswith('<tool_call>{"name": "calc", "arguments": {"expression": "')
    assert learned.endswith(f"</tool_call><|im_end|><answer>{a[0]['answer']}</answer><|im_end|>")
    assert "user" not in learned


def test_warmup_lowers_loss_changes_weights_deterministic(base, tmp_path):
    r1 = warmup.warmup(base, "calc", steps=STEPS, seed=0)
    assert r1.loss_after < r1.loss_before * 0.5, r1.to_dict()
    out1 = warmup.save_warmed(r1, base, tmp_path / "w1")
    r2 = warmup.warmup(base, "calc", steps=STEPS, seed=0)
    out2 = warmup.save_warmed(r2, base, tmp_path / "w2")
    w0 = load_file(str(base / "model.safetensors"))
    w1 = load_file(str(out1 / "model.safetensors"))
    w2 = load_file(str(out2 / "model.safetensors"))
    assert w0.keys() == w1.keys() == w2.keys()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (out1 / "tokenizer.json").exists()


def test_unknown_task_errors(base):
    with pytest.raises(ValueError, match="unknown warm-up task"):
        warmup.make_examples("poetry", 4, 0)
    with pytest.raises(ValueError, match="unknown warm-up task"):
        warmup.warmup(base, "poetry", steps=1)
    r = CliRunner().invoke(cli_serving.model_group, ["warmup", "--model", str(base), "--task", "poetry"])
    assert r.exit_code == 2 and "unknown --task 'poetry'" in r.output


def test_cli_warmup_in_place(tmp_path):
    d = model_init.init_model(tmp_path / "m", size="tiny", seed=0)
    before = load_file(str(d / "model.safetensors"))
    r = CliRunner().invoke(cli_serving.model_group, ["warmup", "--model", str(d), "--task", "price",
                                                     "--steps", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out loss" in r.output
    after = load_file(str(d / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left


def test_tools_task_mixes_kinds_without_multiplication_or_heldout_problems(base):
    from transformers import AutoTokenizer
    demos = warmup.make_examples("tools", 256, 0)
    kinds = [d["kind"] for d in demos]
    assert set(kinds) == {"add", "sub", "price"} and 100 <= kinds.count("price") <= 156
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    for d in demos:
        call = json.loads(d["messages"][1]["tool_calls"][0]["function"]["arguments"])
        name = d["messages"][1]["tool_calls"][0]["function"]["name"]
        assert "*" not in d["messages"][0]["content"]
        assert tool_eval.run_tool(name, call) == d["answer"] == d["messages"][2]["content"]
        key = (warmup.problem_key("price", call["item"]) if name == "price" else
               warmup.problem_key(d["kind"], *map(int, call["expression"].replace("-", " ").replace("+", " ").split())))
        assert not warmup.is_heldout(key)
    # the demonstration renders exactly what the agent puts back into the dialogue
    ids, mask = warmup.encode_example(tok, demos[0]["messages"])
    as_text = [demos[0]["messages"][0], {"role": "assistant", "content": tok.decode(
        [i for i, m in zip(ids, mask) if m], skip_special_tokens=False).split("<|im_end|>")[0]}]
    assert tok.apply_chat_template(as_text, tokenize=False) == tok.apply_chat_template(demos[0]["messages"][:2],
                                                                                         tokenize=False)


def test_step_reply_and_tools():
    assert tool_eval.step_reply("<answer> 42 </answer><|im_end|>") == ("answer", "42")
    assert tool_eval.step_reply('<tool_call>{"name": "calc", "arguments": {"expression": "7-12"}}</tool_call>') == \
        ("tool", "-5")
    assert tool_eval.step_reply('<tool_call>{"name": "price", "arguments": {"item": 412}}</tool_call>') == \
        ("tool", str(warmup.price_of(412)))
    assert tool_eval.step_reply("<tool_call>{oops</tool_call>") == ("tool", "error: tool call is not JSON")
    assert tool_eval.step_reply("hello") == ("stop", None)
    assert tool_eval.run_tool("calc", {"expression": "1;import os"}) == "error: bad expression"
    assert tool_eval.run_tool("rm", {}) == "error: unknown tool"
    assert tool_eval.success_by_kind([{"answer": "1", "kind": "add"}, {"answer": "2", "kind": "price"}],
                                     ["1", None]) == {"add": 1.0, "all": 0.5, "price": 0.0}


def test_stop_at_success_evaluates_the_real_model(base):
    r = warmup.warmup(base, "tools", steps=2, seed=0, stop_at_success=0.5, eval_every=2)
    assert r.steps == 2 and r.evals == [(2, 0.0)]  # untrained: no answers
    assert r.dev_success == {"all": 0.0, "add": 0.0, "sub": 0.0, "price": 0.0}
    with pytest.raises(ValueError, match="stop_at_success"):
        warmup.warmup(base, "tools", steps=1, stop_at_success=1.5)


def _answers_from_eval(n_wrong: int, calls: list):
    """A stand-in for the greedy episodes: wrong for the first n_wrong evaluations, then right."""
    dev = warmup.make_examples("tools", warmup.N_EVAL, warmup.EVAL_SEED_OFFSET)

    def answers(model, tok, questions, **kw):
        assert questions == [d["messages"][0]["content"] for d in dev]
        calls.append(len(questions))
        return [d["answer"] if len(calls) > n_wrong else None for d in dev]
    return answers


def test_stop_at_success_stops_at_the_first_eval_over_threshold(base, monkeypatch):
    calls = []
    monkeypatch.setattr(tool_eval, "greedy_answers", _answers_from_eval(2, calls))
    r = warmup.warmup(base, "tools", steps=50, seed=0, stop_at_success=0.9, eval_every=1)
    assert r.steps == 3 and r.evals == [(1, 0.0), (2, 0.0), (3, 1.0)] and len(calls) == 3
    assert r.dev_success["all"] == 1.0
    calls.clear()
    monkeypatch.setattr(tool_eval, "greedy_answers", _answers_from_eval(99, calls))
    r = warmup.warmup(base, "tools", steps=3, seed=0, stop_at_success=0.9, eval_every=2)
    assert r.steps == 3 and r.evals == [(2, 0.0), (3, 0.0)]  # the maximum, evaluated at the end too


def test_cli_stop_at_success_option(tmp_path, monkeypatch):
    d = model_init.init_model(tmp_path / "m", size="tiny", seed=0)
    monkeypatch.setattr(tool_eval, "greedy_answers", _answers_from_eval(1, []))
    r = CliRunner().invoke(cli_serving.model_group, ["warmup", "--model", str(d), "--task", "tools", "--steps", "9",
                                                     "--stop-at-success", "0.9", "--eval-every", "1"])
    assert r.exit_code == 0, r.output
    assert "on tools: 2 steps" in r.output and "greedy dev success add 100.0% all 100.0%" in r.output
    r = CliRunner().invoke(cli_serving.model_group, ["warmup", "--model", str(d), "--task", "tools",
                                                     "--stop-at-success", "0"])
    assert r.exit_code == 2 and "--stop-at-success" in r.output


def test_few_demos_and_a_model_folder_every_k_steps(tmp_path):
    d = model_init.init_model(tmp_path / "m", size="tiny", seed=0)
    r = CliRunner().invoke(cli_serving.model_group, [
        "warmup", "--model", str(d), "--task", "tools", "--steps", "4", "--demos", "8", "--save-every", "2",
        "--checkpoints", str(tmp_path / "ckpt"), "--out", str(tmp_path / "final")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-2", "step-4"]
    meta = json.loads((tmp_path / "final" / "tracetrain_model.json").read_text())
    assert meta["warmup"]["n_train"] == 8
    step2 = load_file(str(tmp_path / "ckpt" / "step-2" / "model.safetensors"))
    step4 = load_file(str(tmp_path / "ckpt" / "step-4" / "model.safetensors"))
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(step4[k], final[k]) for k in final)  # the last folder is the final model
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)
    assert (tmp_path / "ckpt" / "step-2" / "tokenizer.json").exists()  # each folder loads on its own
    # a smaller demo set is a prefix of a larger one
    assert warmup.make_examples("tools", 8, 0) == warmup.make_examples("tools", 32, 0)[:8]
    bad = CliRunner().invoke(cli_serving.model_group, ["warmup", "--model", str(d), "--task", "tools",
                                                       "--steps", "1", "--save-every", "2"])
    assert bad.exit_code == 2 and "--save-every and --checkpoints go together" in bad.output
