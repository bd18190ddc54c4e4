"""tracetrain model warmup: a short masked SFT lowers held-out loss, deterministic for a seed."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner
from safetensors.torch import load_file
from tracetrain.trainer import cli_serving, model_init, warmup

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
