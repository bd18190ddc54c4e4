"""Runs inside .venv-verl (verl 0.9.1, Ray): converts transitions tables with
tracetrain.trainer.verl_backend and reports what verl made of them, as JSON.

    verl_probe.py convert OUT_DIR CASE.parquet...   one OUT_DIR/CASE.json per table (and
        OUT_DIR/doc_snippet.json when $TT_DOC_SNIPPET names a python file: run on the first table)
    verl_probe.py ray OUT.json CASE.parquet         the conversion as a Ray task (loopback only)

The test (tests/integration/test_verl_backend.py) runs in the main venv and compares.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tracetrain.trainer import verl_backend as vb

PAD = 0


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "values": value.tolist()}
    if isinstance(value, np.ndarray):
        return [None if v is None else (v.item() if hasattr(v, "item") else v) for v in value.tolist()]
    return value


def _dump(data) -> dict:
    return {
        "batch": {k: _jsonable(v) for k, v in data.batch.items()},
        "non_tensor_batch": {k: _jsonable(v) for k, v in data.non_tensor_batch.items()},
        "meta_info": data.meta_info,
    }


def _verl_checks(table) -> dict:
    """What verl's own helpers say about our DataProto."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_response_mask
    from verl.utils.model import compute_position_id_with_mask

    data = vb.to_dataproto(table, PAD)
    data.check_consistency()
    out = {"dataproto": _dump(data)}
    out["verl_position_ids"] = compute_position_id_with_mask(data.batch["attention_mask"]).tolist()
    # compute_response_mask = the attention over the response part (verl's single-turn default)
    out["verl_response_attention"] = compute_response_mask(data).tolist()
    # the actor update's first step (ray_trainer._update_actor): padded -> jagged rows
    from verl.workers.utils.padding import left_right_2_no_padding

    jagged = left_right_2_no_padding(data.to_tensordict())
    out["no_padding_input_ids"] = [row.tolist() for row in jagged["input_ids"].unbind()]
    out["no_padding_position_ids"] = [row.tolist() for row in jagged["position_ids"].unbind()]
    parts = data.chunk(data.batch.batch_size[0]) if len(data) > 1 else [data]
    again = DataProto.concat(parts)
    out["chunk_concat_equal"] = all(torch.equal(again.batch[k], data.batch[k]) for k in data.batch.keys()) and all(
        list(again.non_tensor_batch[k]) == list(data.non_tensor_batch[k]) for k in data.non_tensor_batch
    )
    # verl's GRPO: core_algos directly (two epsilons) and the PPO trainer's advantage step
    for eps in (1e-4, 1e-6):
        grpo = vb.compute_grpo_advantages(vb.to_dataproto(table, PAD), epsilon=eps)
        out[f"grpo_rows_eps{eps:g}"] = vb.row_advantages(grpo).tolist()
        out[f"grpo_tokens_eps{eps:g}"] = grpo.batch["advantages"].tolist()
    trainer = vb.compute_advantage_like_ray_trainer(vb.to_dataproto(table, PAD))
    out["ray_trainer_rows"] = vb.row_advantages(trainer).tolist()
    try:
        vb.to_dataproto(table, PAD, max_prompt_len=1)
        out["too_long_error"] = None
    except ValueError as exc:
        out["too_long_error"] = str(exc)
    return out


def _loss_agreement(table) -> dict:
    """verl's PPO-clip policy loss ('vanilla') and tracetrain's on the same rows and logprobs.

    New logprobs are drawn in verl's response layout [B,R] and scattered to tracetrain's
    full-row layout [B,T] (response column j of row b = position n_prompt[b] + j).
    """
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    from tracetrain.trainer.algorithms import AlgoConfig, ppo_clip_loss
    from tracetrain.trainer.batch import to_batch

    data = vb.to_dataproto(table, PAD)
    ours = to_batch(table, PAD)
    mask = data.batch["response_mask"].float()
    n_prompt = data.batch["attention_mask"][:, : data.batch["prompts"].shape[1]].sum(1)
    width_r = mask.shape[1]
    column = (n_prompt[:, None] + torch.arange(width_r)).clamp(max=ours.input_ids.shape[1] - 1)
    real = data.batch["attention_mask"][:, -width_r:].bool()
    out = {"old_logprobs_same": bool(torch.equal(
        torch.gather(ours.old_logprobs, 1, column) * real, data.batch["rollout_log_probs"] * real))}
    generator = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.5, 2.0):  # small moves; clipped; dual-clipped
        new_r = data.batch["old_log_probs"] + scale * torch.randn(mask.shape, generator=generator)
        new_t = torch.zeros_like(ours.old_logprobs)
        new_t[real.nonzero(as_tuple=True)[0], column[real]] = new_r[real]
        verl_loss, _ = core_algos.get_policy_loss_fn("vanilla")(
            data.batch["old_log_probs"], new_r, data.batch["advantages"], mask, "token-mean",
            ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2))
        our_loss = ppo_clip_loss(new_t, ours, AlgoConfig(clip_eps=0.2, dual_clip_c=3.0)).loss
        out[f"scale{scale:g}"] = [float(verl_loss), float(our_loss)]
    return out


def _run_doc_snippet(snippet: Path, table) -> list:
    """docs/scale-out.md's python block, with `transitions` and `tokenizer` supplied."""
    from types import SimpleNamespace

    scope = {"transitions": table, "tokenizer": SimpleNamespace(pad_token_id=PAD)}
    exec(compile(snippet.read_text(), str(snippet), "exec"), scope)  # noqa: S102 - our own docs
    return scope["batch"].batch["advantages"].tolist()


def convert(out_dir: Path, paths: list[Path], snippet: Path | None = None) -> None:
    if snippet is not None:
        (out_dir / "doc_snippet.json").write_text(json.dumps(_run_doc_snippet(snippet, pq.read_table(paths[0]))))
    for path in paths:
        result = _verl_checks(pq.read_table(path))
        if path.stem.startswith("ours_"):  # tables that carry tracetrain's advantages
            result["loss"] = _loss_agreement(pq.read_table(path))
        (out_dir / f"{path.stem}.json").write_text(json.dumps(result))


def ray_smoke(out_path: Path, path: Path) -> None:
    """A Ray task converts the batch; the DataProto comes back through Ray's object store."""
    import ray

    table = pq.read_table(path)
    started = time.perf_counter()
    ray.init(_node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started

    @ray.remote(num_cpus=1)
    def to_dataproto_remote(t):
        from tracetrain.trainer import verl_backend

        return verl_backend.compute_grpo_advantages(verl_backend.to_dataproto(t, PAD))

    try:
        remote = ray.get(to_dataproto_remote.remote(table), timeout=120)
        nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
    finally:
        ray.shutdown()
    local = vb.compute_grpo_advantages(vb.to_dataproto(table, PAD))
    same = all(torch.equal(remote.batch[k], local.batch[k]) for k in local.batch.keys())
    out_path.write_text(json.dumps({
        "same_as_local": same, "keys": sorted(remote.batch.keys()), "node_addresses": nodes,
        "init_s": init_s, "total_s": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    mode, target, *inputs = sys.argv[1:]
    if mode == "convert":
        snippet = os.environ.get("TT_DOC_SNIPPET")
        convert(Path(target), [Path(p) for p in inputs], Path(snippet) if snippet else None)
    elif mode == "ray":
        ray_smoke(Path(target), Path(inputs[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
