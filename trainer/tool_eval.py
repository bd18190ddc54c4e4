"""Greedy multi-turn evaluation of a local HF model on the tool task, in process (no server).

The warm-up's early stop needs "how many dev problems does the model solve greedily",
measured the way the demo agent (examples/tool_agent.py) runs an episode:

* render the dialogue with the model's chat template, generate until ``<|im_end|>``;
* ``<answer>N</answer>`` ends the episode with answer N;
* ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` runs the tool (``calc``:
  ``a+b``, ``a-b`` or ``a*b`` on integers; ``price``: ``price_of(item)``) and appends a
  ``tool`` message with its result (or ``error: ...``);
* anything else ends the episode without an answer; at most ``max_calls`` LLM calls.

The assistant turn goes back into the dialogue as the text the model wrote (content, not
``tool_calls``): the template renders both the same way, so the next prompt extends the
previous prompt + response token for token when the response is canonically tokenised.
Episodes are generated in batches (left padding). torch is imported inside the functions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_EXPRESSION = re.compile(r"^\s*(-?\d{1,6})\s*([-+*])\s*(-?\d{1,6})\s*$")
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")


def price_of(item: int) -> int:
    """The price tool's (deterministic) answer; same formula as warmup.price_of."""
    return (item * 7919 + 13) % 900 + 10


def run_tool(name: Any, arguments: Any) -> str:
    """The tool's result as the text of a ``tool`` message; ``error: ...`` on bad input."""
    if not isinstance(arguments, dict):
        return "error: arguments must be an object"
    if name == "calc":
        m = _EXPRESSION.match(str(arguments.get("expression", "")))
        if not m:
            return "error: bad expression"
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if name == "price":
        item = arguments.get("item")
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool):
            return "error: item must be an integer"
        return str(price_of(item))
    return "error: unknown tool"


def step_reply(text: str) -> tuple[str, str | None]:
    """Classify one assistant reply: ("answer", N) | ("tool", tool message text) | ("stop", None)."""
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    answer = _ANSWER.search(text)
    if answer:
        return "answer", answer.group(1).strip()
    call = _TOOL_CALL.search(text)
    if call:
        try:
            payload = json.loads(call.group(1))
        except ValueError:
            return "tool", "error: tool call is not JSON"
        if not isinstance(payload, dict):
            return "tool", "error: tool call is not an object"
        return "tool", run_tool(payload.get("name"), payload.get("arguments"))
    return "stop", None


def _generate(model: Any, tok: Any, dialogues: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies (text up to and excluding ``<|im_end|>``) for a batch of dialogues."""
    import torch
    prompts = [tok.apply_chat_template(d, tokenize=False, add_generation_prompt=True) for d in dialogues]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, e in enumerate(encoded):  # left padding: generation continues every row at the right edge
        ids[r, width - len(e):] = torch.tensor(e)
        attn[r, width - len(e):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [tok.decode(row[width:], skip_special_tokens=False) for row in out]


def greedy_answers(model: Any, tok: Any, questions: list[str], max_calls: int = 3,
                   max_new_tokens: int = 48, batch_size: int = 128) -> list[str | None]:
    """Run one greedy episode per question; the final answers (None: no answer given)."""
    answers: list[str | None] = [None] * len(questions)
    dialogues = [[{"role": "user", "content": q}] for q in questions]
    active = list(range(len(questions)))
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_calls):
            if not active:
                break
            replies: list[str] = []
            for start in range(0, len(active), batch_size):
                chunk = active[start:start + batch_size]
                replies += _generate(model, tok, [dialogues[i] for i in chunk], max_new_tokens)
            still = []
            for i, reply in zip(active, replies):
                kind, value = step_reply(reply)
                if kind == "answer":
                    answers[i] = value
                elif kind == "tool":
                    dialogues[i] += [{"role": "assistant", "content": reply.split("<|im_end|>", 1)[0]},
                                     {"role": "tool", "content": value}]
                    still.append(i)
            active = still
    finally:
        model.train(was_training)
    return answers


def success_by_kind(examples: list[dict], answers: list[str | None]) -> dict[str, float]:
    """Exact-match success overall (key ``all``) and per example ``kind``."""
    hits, totals = Counter(), Counter()
    for ex, ans in zip(examples, answers):
        ok = int(ans is not None and ans == ex["answer"])
        for key in {"all", ex.get("kind", "all")}:
            totals[key] += 1
            hits[key] += ok
    return {k: hits[k] / totals[k] for k in sorted(totals)}
