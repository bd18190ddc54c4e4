"""Do the logprobs vLLM returns equal the trainer's own forward pass on the same weights?

Sample from the server at temperature 1 with ``return_token_ids`` + ``logprobs``, then
run one torch forward pass over prompt + completion ids with the *same* weights
(base folder, optionally a full-weights folder and/or a peft adapter merged in) and
compare ``log_softmax`` at the sampled ids. fp32 serving agrees to ~1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .serving import http_json

DEFAULT_PROMPTS = [
    [{"role": "user", "content": "What is 37*48?"}],
    [{"role": "system", "content": "Use the calc tool, then answer with the number."},
     {"role": "user", "content": "price of water 412?"}],
    [{"role": "user", "content": "Write one word about the long day and the water people call oil."}],
]


@dataclass
class Agreement:
    max_abs: float
    mean_abs: float
    max_seq_sum_abs: float
    n_tokens: int
    samples: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs,
                "max_seq_sum_abs": self.max_seq_sum_abs, "n_tokens": self.n_tokens}


def sample(url: str, model: str, messages: list[dict], max_tokens: int = 32, seed: int = 0,
           temperature: float = 1.0) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "logprobs": True, "return_token_ids": True, "ignore_eos": True}
    status, data, headers = http_json(url.rstrip("/") + "/v1/chat/completions", body, timeout=120)
    if status != 200:
        raise RuntimeError(f"chat completion failed: {status} {data}")
    ch = data["choices"][0]
    return {"prompt_ids": data["prompt_token_ids"], "ids": ch["token_ids"],
            "logprobs": [c["logprob"] for c in ch["logprobs"]["content"]], "headers": headers,
            "text": ch["message"]["content"]}


def load_reference(model_dir: str, full_weights: str | None = None, adapter: str | None = None) -> Any:
    """The trainer-side fp32 model: base config, optional replaced weights, optional merged LoRA."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if full_weights:
        from safetensors.torch import load_file
        sd: dict = {}
        for f in sorted(Path(full_weights).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"weights do not match the model: missing {missing} unexpected {unexpected}")
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def reference_logprobs(model: Any, prompt_ids: list[int], ids: list[int], temperature: float = 1.0) -> list[float]:
    import torch
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logits = model(full).logits[0].float() / temperature
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [float(lp[n - 1 + i, t]) for i, t in enumerate(ids)]


def check_agreement(url: str, served_model: str, model_dir: str, *, full_weights: str | None = None,
                    adapter: str | None = None, prompts: list | None = None, max_tokens: int = 32,
                    seed: int = 0) -> Agreement:
    ref = load_reference(model_dir, full_weights, adapter)
    diffs: list[float] = []
    seq: list[float] = []
    samples = []
    for i, messages in enumerate(prompts or DEFAULT_PROMPTS):
        s = sample(url, served_model, messages, max_tokens=max_tokens, seed=seed + i)
        r = reference_logprobs(ref, s["prompt_ids"], s["ids"])
        d = [abs(a - b) for a, b in zip(s["logprobs"], r)]
        diffs += d
        seq.append(abs(sum(s["logprobs"]) - sum(r)))
        samples.append(s)
    return Agreement(max(diffs), sum(diffs) / len(diffs), max(seq), len(diffs), samples)
