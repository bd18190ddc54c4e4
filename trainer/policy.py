"""The policy being trained: a Hugging Face causal LM (fp32, CPU), full or LoRA, and its checkpoints.

* ``load_policy(model_dir, lora=LoraSpec(...), agents=("a", "b"))``: with LoRA, one adapter
  **per agent** on one shared base model (several policies in one run; an agent's
  transitions train only its adapter, the other adapters and the base stay untouched).
  Without agents, or with full fine-tuning, one policy serves every selected agent.
* ``token_logprobs(model, batch) -> [B, T]``: log-probability of ``input_ids[b, t]`` given
  the tokens before it (logits at t - 1); 0 at t = 0.
* ``save_checkpoint`` / ``load_checkpoint``: weights (full) or adapters (LoRA), optimizer
  states and the trainer's state dict, written to a temporary folder and renamed into
  place, then ``LATEST`` is replaced atomically: a kill -9 at any point leaves either the
  previous or the new checkpoint, never a torn one.

torch/transformers/peft are imported inside the functions only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DEFAULT_ADAPTER = "default"
LATEST_FILE = "LATEST"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tracetrain_model.json")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"  # every linear layer but lm_head


@dataclass
class Policy:
    """One base model with zero (full fine-tuning) or one adapter per agent (LoRA)."""

    model: Any                      # torch.nn.Module: the HF model, or a peft PeftModel over it
    tokenizer: Any
    model_dir: str
    lora: LoraSpec | None
    agents: tuple[str | None, ...]  # (None,): one policy for every selected agent
    adapters: dict[str | None, str] = field(default_factory=dict)  # agent -> peft adapter name

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def policy_for(self, agent: str | None) -> str | None:
        """The policy key (an entry of ``agents``) that trains ``agent``'s transitions."""
        return agent if agent in self.agents and agent is not None else self.agents[0]

    def activate(self, key: str | None) -> Any:
        """Make ``key``'s adapter the active one (LoRA) and return the module to run."""
        if self.lora is not None:
            self.model.set_adapter(self.adapters[key])
        return self.model

    def parameters_of(self, key: str | None) -> list[Any]:
        """Trainable parameters of one policy: its adapter (LoRA) or every weight (full)."""
        if self.lora is None:
            return [p for p in self.model.parameters()]
        marker = f".{self.adapters[key]}."
        return [p for n, p in self.model.named_parameters() if "lora_" in n and marker in n]

    def full_state_dict(self) -> dict[str, Any]:
        """HF-named weights of the base model (full fine-tuning), for a full push."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def save_adapter(self, key: str | None, dest: str | os.PathLike) -> Path:
        """Write ``key``'s adapter as a standalone peft folder (adapter_config.json at its top)."""
        dest = Path(dest)
        name = self.adapters[key]
        tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), selected_adapters=[name])
        src = tmp if name == DEFAULT_ADAPTER else tmp / name  # peft nests non-default adapters
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(src, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return dest


def adapter_name(agent: str | None) -> str:
    """A peft-safe adapter name for an agent (peft module keys cannot hold dots)."""
    if agent is None:
        return DEFAULT_ADAPTER
    return "agent_" + re.sub(r"[^A-Za-z0-9_]", "_", agent)


def load_policy(model_dir: str | os.PathLike, *, lora: LoraSpec | None = None,
                agents: Sequence[str] = (), seed: int = 0) -> Policy:
    """Load the model in ``model_dir`` in fp32 on CPU, with one LoRA adapter per agent if asked.

    Several agents without LoRA share one full policy (a note in the CLI says so).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    keys: tuple[str | None, ...] = tuple(agents) if (lora is not None and len(agents) > 1) else (None,)
    adapters: dict[str | None, str] = {}
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                            else list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        adapters = {k: adapter_name(k) for k in keys}
        first, *rest = keys
        model = get_peft_model(model, config, adapter_name=adapters[first])
        for k in rest:
            model.add_adapter(adapters[k], config)
    model.train()
    return Policy(model, tokenizer, str(model_dir), lora, keys, adapters)


def token_logprobs(model: Any, batch: Any) -> Any:
    """``[B, T]`` logprob of ``batch.input_ids[b, t]`` from the logits at ``t - 1``; 0 at ``t = 0``.

    ``logits.gather - logsumexp`` avoids materialising a second ``[B, T, V]`` log-softmax.
    """
    import torch
    ids = batch.input_ids
    logits = model(input_ids=ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target = ids[:, 1:].unsqueeze(-1)
    picked = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


# ---------------------------------------------------------------- checkpoints

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"step-{step:010d}"


def save_checkpoint(policy: Policy, optimizers: dict[str | None, Any], state: dict[str, Any],
                    out_dir: str | os.PathLike, keep: int = 3) -> Path:
    """Write ``out_dir/step-<N>`` (N = ``state["step"]``) and point ``out_dir/LATEST`` at it.

    Contents: ``model/`` (a loadable HF folder, full fine-tuning) or ``adapters/<agent>/``
    (LoRA), ``optim/<key>.pt``, ``trainer_state.json``. Older checkpoints beyond ``keep``
    are deleted after the new one is in place.
    """
    import torch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, int(state["step"]))
    tmp = out / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if policy.lora is None:
        policy.model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        linked = _link_files(Path(policy.model_dir), tmp / "model", TOKENIZER_FILES)
    else:
        linked = set()
        for key in policy.agents:
            policy.save_adapter(key, tmp / "adapters" / policy.adapters[key])
    (tmp / "optim").mkdir()
    for key, opt in optimizers.items():
        torch.save(opt.state_dict(), tmp / "optim" / f"{adapter_name(key)}.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, sort_keys=True))
    for f in tmp.rglob("*"):
        if f.is_file() and f not in linked:  # hard links share the (already durable) source's data
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(out)
    latest_tmp = out / f".{LATEST_FILE}.tmp{os.getpid()}"
    latest_tmp.write_text(final.name)
    with open(latest_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, out / LATEST_FILE)
    _fsync_dir(out)
    stale = [old for old in (sorted(out.glob("step-*"))[:-keep] if keep > 0 else []) if old != final]
    if stale:  # deleting is slow on some filesystems and nothing waits for it: do it off the step's path
        threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in stale], daemon=True).start()
    return final


def _link_files(src: Path, dest: Path, names: Sequence[str]) -> set[Path]:
    """Hard-link (else copy) ``names`` present in ``src`` into ``dest``; returns the linked paths."""
    linked = set()
    for name in names:
        if not (src / name).exists():
            continue
        try:
            os.link(src / name, dest / name)
            linked.add(dest / name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src / name, dest / name)
    return linked


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``LATEST`` points at, or None (no checkpoint yet)."""
    latest = Path(out_dir) / LATEST_FILE
    if not latest.exists():
        return None
    path = Path(out_dir) / latest.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def load_checkpoint(policy: Policy, optimizers: dict[str | None, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Restore weights/adapters and optimizer states from ``path``; returns the trainer state."""
    import torch
    path = Path(path)
    if policy.lora is None:
        from safetensors.torch import load_file
        weights: dict[str, Any] = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = policy.model.load_state_dict(weights, strict=False)
        # a tied or buffer key can be absent from the file; real weights must all be there
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        for key in policy.agents:
            name = policy.adapters[key]
            folder = path / "adapters" / name
            state = load_file(str(folder / "adapter_model.safetensors"))
            set_peft_model_state_dict(policy.model, state, adapter_name=name)
    for key, opt in optimizers.items():
        f = path / "optim" / f"{adapter_name(key)}.pt"
        if f.exists():
            opt.load_state_dict(torch.load(f, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
