"""What the training examples measure (examples/sft_from_best.py, examples/offline_vs_online.py).

* ``heldout_success(model_dir, n)``: greedy multi-turn success of a local model folder on the
  demo's ``n`` held-out tool tasks (examples/demo_tasks.py), in process with HF ``generate``
  (trainer/tool_eval.py); on the demo's model it gives exactly what vLLM gives (docs/demo.md).
* ``response_logprob(model_dir, data_dir, where)``: mean per-token log-probability the model
  gives to the sampled responses of the stored episodes ``where`` selects (the episodes a
  run trains on): it rises when training on them took effect.
* ``checkpoint_model(out_dir)``: the model folder of a run's latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from demo_tasks import HELDOUT_SEED, make_tasks


def checkpoint_model(out_dir: str | Path) -> Path:
    """``OUT/step-N/model`` of the checkpoint ``OUT/LATEST`` points at."""
    from tracetrain.trainer.policy import latest_checkpoint

    path = latest_checkpoint(out_dir)
    if path is None:
        raise SystemExit(f"no checkpoint under {out_dir}")
    return path / "model"


def heldout_success(model_dir: str | Path, n: int) -> dict[str, float]:
    """Greedy success on the first ``n`` held-out tasks: ``{"all": x, "add": .., "sub": .., "price": ..}``."""
    from tracetrain.trainer.tool_eval import greedy_answers, success_by_kind
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = make_tasks(n, HELDOUT_SEED, "heldout")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    answers = greedy_answers(model, tok, [t["question"] for t in tasks])
    return {k: round(v, 4) for k, v in success_by_kind(tasks, answers).items()}


def response_logprob(model_dir: str | Path, data_dir: str | Path, where: str, limit_rows: int = 256) -> float:
    """Mean log-probability per sampled response token of (up to ``limit_rows``) selected rows."""
    import torch
    from tracetrain.trainer import store, transitions
    from tracetrain.trainer.batch import to_batch
    from tracetrain.trainer.policy import load_policy, token_logprobs

    con = store.connect(data_dir)
    try:
        rows, _ = transitions.build_transitions(transitions.load_calls(con, where=where))
    finally:
        con.close()
    if rows.num_rows == 0:
        raise SystemExit(f"no trainable episodes match {where!r} in {data_dir}")
    rows = rows.slice(0, limit_rows)
    policy = load_policy(model_dir)
    batch = to_batch(rows, policy.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(policy.activate(None), batch)  # [B, T]
    mask = batch.response_mask.to(lp.dtype)
    return round(float((lp * mask).sum() / mask.sum()), 4)


def write_json(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)
