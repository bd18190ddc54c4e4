"""Tasks and grader of the demo's tool task (stdlib only).

Half the problems are arithmetic (``a+b`` or ``a-b``, a and b in 2..99; no ``*``: RL
sharpens skills that exist, it does not create one that starts near 0%), half are price
look-ups (item 100..999, answer ``price_of(item)`` from the agent's ``price`` tool).
Each kind has 4 phrasings, the same as the warm-up demonstrations
(``tracetrain model warmup --task tools``).

Held-out and training problems never share a problem (operands and operator, or item):
a problem is held out when ``crc32(key) % 4 == 0``, the rule the warm-up uses to keep
its demonstrations off the held-out set (trainer/warmup.py ``is_heldout``).

    python examples/demo_tasks.py --out demo-tasks            # train.jsonl (4800) + heldout.jsonl (256)

Each line: ``{"id", "question", "answer", "kind"}`` (kind: add, sub, price).
``grade(task, answer) -> 1.0 | 0.0`` is exact match of the final answer.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from pathlib import Path

CALC_PHRASES = ["What is {a}{op}{b}?", "Compute {a}{op}{b}.", "Tell me {a}{op}{b}.", "Calculate {a}{op}{b}"]
PRICE_PHRASES = ["How much does item {i} cost?", "price of item {i}?", "What is the price of item {i}?",
                 "Look up item {i}."]
HELDOUT_BUCKETS = 4
N_HELDOUT = 256
HELDOUT_SEED = 12345
N_TRAIN = 4800  # 300 GRPO steps x 16 prompts, each prompt fresh
TRAIN_SEED = 0


def price_of(item: int) -> int:
    return (item * 7919 + 13) % 900 + 10


def problem_key(kind: str, a: int, b: int = 0) -> str:
    """``"add:37:12"``, ``"sub:37:12"``, ``"price:412"``."""
    return f"price:{a}" if kind == "price" else f"{kind}:{a}:{b}"


def is_heldout(key: str) -> bool:
    return zlib.crc32(key.encode()) % HELDOUT_BUCKETS == 0


def _problem(rng: random.Random, heldout: bool) -> tuple[str, str, str, int]:
    """(key, kind, question, answer) of a problem on the requested side of the split."""
    while True:
        if rng.random() < 0.5:
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-")
            kind = "add" if op == "+" else "sub"
            key, value = problem_key(kind, a, b), (a + b if op == "+" else a - b)
            question = rng.choice(CALC_PHRASES).format(a=a, op=op, b=b)
        else:
            item = rng.randint(100, 999)
            kind, key, value = "price", problem_key("price", item), price_of(item)
            question = rng.choice(PRICE_PHRASES).format(i=item)
        if is_heldout(key) == heldout:
            return key, kind, question, value


def make_tasks(n: int, seed: int, split: str) -> list[dict]:
    """``n`` seeded tasks from the ``train`` or ``heldout`` side; held-out problems are distinct."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, not {split!r}")
    rng = random.Random(f"tools-{split}:{seed}")
    seen: set[str] = set()
    tasks = []
    while len(tasks) < n:
        key, kind, question, value = _problem(rng, heldout=split == "heldout")
        if split == "heldout":
            if key in seen:
                continue
            seen.add(key)
        tasks.append({"id": f"{split}-{seed}-{len(tasks):05d}", "question": question, "answer": str(value),
                      "kind": kind})
    return tasks


def grade(task: dict, answer: str | None) -> float:
    """1.0 when the agent's final answer is exactly the task's answer (surrounding spaces ignored)."""
    return 1.0 if answer is not None and str(answer).strip() == str(task["answer"]) else 0.0


def grade_partial(task: dict, answer: str | None) -> float:
    """1.0 for the right answer; 0.1 for a wrong number (the agent kept its format); else 0.0.

    The small partial credit gives GRPO groups whose rewards vary even when a barely warmed-up
    model gets almost nothing right (exact match alone leaves most groups all zero). The demo's
    short form (``--quick``) and the two-agent example train with it; evaluations use ``grade``.
    """
    if grade(task, answer) == 1.0:
        return 1.0
    text = "" if answer is None else str(answer).strip()
    return 0.1 if text.lstrip("-").isdigit() else 0.0


def write_jsonl(path: Path, tasks: list[dict]) -> None:
    path.write_text("".join(json.dumps(t, sort_keys=True) + "\n" for t in tasks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=N_TRAIN, help="number of training tasks")
    parser.add_argument("--heldout", type=int, default=N_HELDOUT, help="number of held-out tasks")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of the training tasks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", make_tasks(args.train, args.seed, "train"))
    write_jsonl(out / "heldout.jsonl", make_tasks(args.heldout, HELDOUT_SEED, "heldout"))
    print(f"wrote {out / 'train.jsonl'} ({args.train}) and {out / 'heldout.jsonl'} ({args.heldout})")


if __name__ == "__main__":
    main()
