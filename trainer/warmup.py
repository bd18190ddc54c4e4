"""Supervised warm-up of a ``tracetrain model init`` model on a tool task (CPU, seconds).

``tracetrain model warmup --model DIR --task calc`` fine-tunes the tiny Qwen2 on seeded
demonstrations in the model's own chat template and tool-call format::

    user:      What is 37*12?
    assistant: <tool_call>{"name": "calc", "arguments": {"expression": "37*12"}}</tool_call>
    tool:      444
    assistant: <answer>444</answer>

with the loss on assistant tokens only (their ``<|im_end|>`` included), AdamW lr 2e-3,
batch 32, grad-clip 1.0, stopped after a fixed number of steps or, with
``stop_at_success``, as soon as greedy multi-turn success on a dev set reaches a threshold
(the recipe of shared/notes/rl-feasibility.md: an early-stopped warm-up so RL starts from
a low but non-zero success rate; the success curve is a cliff, so a threshold, not a step
count). Deterministic for a seed (and thread count).

Task ``tools`` is the demo's task: 50/50 ``calc`` with ``+``/``-`` (no ``*``: RL does not
learn a sub-skill that starts near 0%) and ``price`` look-ups. Its demonstrations never
use a held-out problem (``is_heldout``), so examples/demo_tasks.py can draw the held-out
set from the same rule.

torch/transformers are imported inside the functions only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TASKS = ("calc", "price", "tools")
DEFAULT_STEPS = 90  # tiny, seed 0: greedy calc success ~12% (dev, 128 problems); 150 steps ~58%
DEFAULT_LR = 2e-3
BATCH_SIZE = 32
N_TRAIN = 256
N_EVAL = 128
EVAL_SEED_OFFSET = 12345  # held-out examples use seed + this offset
DEFAULT_EVAL_EVERY = 10  # steps between greedy dev evaluations when stopping at a success rate
HELDOUT_BUCKETS = 4  # tools task: a problem is held out when crc32(key) % 4 == 0 (a quarter of them)

_CALC_PHRASES = ["What is {a}{op}{b}?", "Compute {a}{op}{b}.", "Tell me {a}{op}{b}.", "Calculate {a}{op}{b}"]
_PRICE_PHRASES = ["How much does item {i} cost?", "price of item {i}?", "What is the price of item {i}?",
                  "Look up item {i}."]


def price_of(item: int) -> int:
    """The price tool's (deterministic) answer."""
    return (item * 7919 + 13) % 900 + 10


def problem_key(kind: str, a: int, b: int = 0) -> str:
    """``"add:37:12"``, ``"sub:37:12"`` or ``"price:412"``: what makes two problems the same."""
    return f"price:{a}" if kind == "price" else f"{kind}:{a}:{b}"


def is_heldout(key: str) -> bool:
    """True for the quarter of problems reserved for held-out evaluation (tools task)."""
    return zlib.crc32(key.encode()) % HELDOUT_BUCKETS == 0


def _tools_problem(rng: random.Random) -> tuple[str, str, str, dict, int]:
    """(kind, question, tool name, tool arguments, value) of a training-side tools problem."""
    while True:
        if rng.random() < 0.5:
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-")
            kind = "add" if op == "+" else "sub"
            if not is_heldout(problem_key(kind, a, b)):
                return (kind, rng.choice(_CALC_PHRASES).format(a=a, op=op, b=b), "calc",
                        {"expression": f"{a}{op}{b}"}, a + b if op == "+" else a - b)
        else:
            item = rng.randint(100, 999)
            if not is_heldout(problem_key("price", item)):
                return ("price", rng.choice(_PRICE_PHRASES).format(i=item), "price", {"item": item},
                        price_of(item))


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown warm-up task {task!r}; choose one of {', '.join(TASKS)}")


def make_examples(task: str, n: int, seed: int) -> list[dict]:
    """``n`` seeded chat examples ``{"messages": [...], "answer": str}`` for ``task``.

    Messages are OpenAI-style (assistant ``tool_calls``, ``tool`` turns) so that the
    model's chat template renders them in its tool-call format.
    """
    _check_task(task)
    rng = random.Random(f"{task}:{seed}")
    out = []
    for k in range(n):
        if task == "calc":
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            question = rng.choice(_CALC_PHRASES).format(a=a, op=op, b=b)
            name, args, kind = "calc", {"expression": f"{a}{op}{b}"}, {"+": "add", "-": "sub", "*": "mul"}[op]
        elif task == "price":
            item = rng.randint(100, 999)
            value = price_of(item)
            question = rng.choice(_PRICE_PHRASES).format(i=item)
            name, args, kind = "price", {"item": item}, "price"
        else:
            kind, question, name, args, value = _tools_problem(rng)
        call_id = f"call_{k}"
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": str(value)},
            {"role": "assistant", "content": f"<answer>{value}</answer>"},
        ]
        out.append({"messages": messages, "answer": str(value), "kind": kind})
    return out


def encode_example(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered dialogue and a 0/1 mask marking assistant-generated tokens.

    An assistant turn's tokens are those after its ``<|im_start|>assistant\\n`` header up to
    and including its ``<|im_end|>`` (not the newline after it).
    """
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i]) if i else "") + len("<|im_start|>assistant\n")
            end = len(render(messages[:i + 1])) - 1  # drop the trailing "\n"
            spans.append((start, end))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@dataclass
class WarmupReport:
    task: str
    steps: int
    seed: int
    lr: float
    loss_before: float  # held-out masked mean token loss
    loss_after: float
    train_loss_first: float
    train_loss_last: float
    seconds: float
    n_train: int
    n_eval: int
    stop_at_success: float | None = None
    dev_success: dict | None = None  # greedy dev success (overall and per kind) at the end, when measured
    evals: list | None = None  # [(step, greedy dev success), ...] when stopping at a success rate
    model: Any = None  # the fine-tuned model (not serialised)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def _batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for r, (x, m) in enumerate(encoded):
        t = torch.tensor(x, dtype=torch.long)
        ids[r, :len(x)] = t
        attn[r, :len(x)] = 1
        labels[r, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), t, torch.tensor(-100))
    return ids, attn, labels


def _loss(model: Any, batch: tuple[Any, Any, Any]) -> Any:
    import torch.nn.functional as F
    ids, attn, labels = batch
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


def warmup(model_dir: str | os.PathLike, task: str = "calc", steps: int = DEFAULT_STEPS, seed: int = 0,
           lr: float = DEFAULT_LR, stop_at_success: float | None = None,
           eval_every: int = DEFAULT_EVAL_EVERY, n_demos: int = N_TRAIN, save_every: int | None = None,
           on_save: Callable[[int, Any], None] | None = None) -> WarmupReport:
    """Short masked-SFT of the model in ``model_dir`` on ``task``; the model is in ``report.model``.

    With ``stop_at_success`` (0..1), ``steps`` is a maximum: every ``eval_every`` steps the
    model runs the dev problems greedily, multi-turn, with the tools (tool_eval), and
    training stops at the first evaluation whose success rate is >= the threshold.
    ``n_demos`` demonstrations are used (the first ones of the seeded stream, so a smaller
    set is a prefix of a larger one). With ``save_every``, ``on_save(step, model)`` is
    called every that many steps (the "why RL" example keeps those checkpoints).
    """
    _check_task(task)
    if n_demos < 1:
        raise ValueError(f"n_demos must be >= 1, not {n_demos}")
    if save_every is not None and (save_every < 1 or on_save is None):
        raise ValueError("save_every must be >= 1 and needs on_save")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    if stop_at_success is not None and not 0.0 < stop_at_success <= 1.0:
        raise ValueError(f"stop_at_success must be in (0, 1], not {stop_at_success}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, not {eval_every}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tool_eval import greedy_answers, success_by_kind

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    pad_id = tok.pad_token_id
    train = [encode_example(tok, ex["messages"]) for ex in make_examples(task, n_demos, seed)]
    dev = make_examples(task, N_EVAL, seed + EVAL_SEED_OFFSET)
    held = _batch([encode_example(tok, ex["messages"]) for ex in dev], pad_id)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(_loss(model, held))

    def dev_success() -> dict[str, float]:
        return success_by_kind(dev, greedy_answers(model, tok, [ex["messages"][0]["content"] for ex in dev]))

    loss_before = held_out_loss()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    first = last = float("nan")
    order: list[int] = []
    evals: list[tuple[int, float]] = []
    success: dict[str, float] | None = None
    done = 0
    model.train()
    for step in range(steps):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        loss = _loss(model, _batch([train[i] for i in idx], pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = loss.item()
        if step == 0:
            first = last
        done = step + 1
        if save_every is not None and done % save_every == 0:
            on_save(done, model)
        if stop_at_success is not None and done % eval_every == 0:
            success = dev_success()
            evals.append((done, success["all"]))
            if success["all"] >= stop_at_success:
                break
    if stop_at_success is not None and (not evals or evals[-1][0] != done):
        success = dev_success()
        evals.append((done, success["all"]))
    loss_after = held_out_loss()
    return WarmupReport(task=task, steps=done, seed=seed, lr=lr, loss_before=loss_before, loss_after=loss_after,
                        train_loss_first=first, train_loss_last=last, seconds=time.perf_counter() - t0,
                        n_train=n_demos, n_eval=N_EVAL, stop_at_success=stop_at_success, dev_success=success,
                        evals=evals if stop_at_success is not None else None, model=model)


def save_checkpoint(model: Any, model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A loadable model folder at ``out``: ``model_dir``'s tokenizer and config files, ``model``'s weights."""
    target = Path(out)
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    return target


def save_warmed(report: WarmupReport, model_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the warmed weights to ``out`` (a copy of ``model_dir``) or over ``model_dir``.

    ``save_pretrained`` goes to a temporary sibling folder, then each file is renamed into
    place, so a crash never leaves half-written weights.
    """
    src = Path(model_dir)
    target = Path(out) if out is not None else src
    if target.resolve() != src.resolve():
        shutil.copytree(src, target, dirs_exist_ok=True)
    tmp = target.parent / f".{target.name}.warmup-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        report.model.save_pretrained(tmp, safe_serialization=True)
        meta_path = target / "tracetrain_model.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["warmup"] = {k: v for k, v in report.to_dict().items() if k != "seconds"}
        (tmp / "tracetrain_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in sorted(tmp.iterdir()):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
