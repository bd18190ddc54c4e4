"""tracetrain model init: offline, deterministic for a seed, the shape vLLM's CPU backend serves."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tracetrain.trainer import model_init  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = model_init.init_model(root / "a", size="tiny", seed=0)
    b = model_init.init_model(root / "b", size="tiny", seed=0)
    c = model_init.init_model(root / "c", size="tiny", seed=1)
    return a, b, c


def test_same_seed_identical_files(made):
    a, b, c = made
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert model_init.folder_digest(a) == model_init.folder_digest(b)
    assert model_init.folder_digest(a) != model_init.folder_digest(c)


def test_config_tied_head_dim_64_fp32(made):
    a = made[0]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["initializer_range"] == 0.02
    assert cfg["head_dim"] == 64
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    from safetensors.torch import load_file
    sd = load_file(str(a / "model.safetensors"))
    # tied: the checkpoint holds the embeddings only, and the loaded head is the same tensor
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    assert all(t.dtype == torch.float32 for t in sd.values())
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(a), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_chat_template_and_tool_calls(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    a = made[0]
    tok = AutoTokenizer.from_pretrained(str(a), local_files_only=True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 12*3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "12*3"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "36"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 12*3?<|im_end|>\n"
                    '<|im_start|>assistant\n<tool_call>{"name": "calc", "arguments": {"expression": "12*3"}}'
                    "</tool_call><|im_end|>\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # digits are one token each
    assert len(tok("12345")["input_ids"]) == 5
    model = AutoModelForCausalLM.from_pretrained(str(a))
    assert model.config.vocab_size >= len(tok)
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(out).all()


def test_small_size_and_bad_size(tmp_path):
    cfg = model_init.build_config("small", 512, model_init.build_tokenizer(0))
    assert cfg.head_dim == 64 and cfg.tie_word_embeddings is True
    with pytest.raises(ValueError):
        model_init.build_config("huge", 512, model_init.build_tokenizer(0))
