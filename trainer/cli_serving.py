"""`tracetrain model init|warmup` and `tracetrain serve` (entry points in the ``tracetrain.cli`` group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("model")
def model_group() -> None:
    """Make the small local models the trainer and vLLM use (offline)."""


@model_group.command("init")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (HF format).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed -> identical files.")
def model_init_command(out: str, size: str, seed: int) -> None:
    """A random-init Qwen2 (head_dim 64, lm_head tied to the embeddings, fp32) and a byte-level BPE tokenizer."""
    try:
        from .model_init import folder_digest, init_model
        path = init_model(out, size=size, seed=seed)
    except ImportError as exc:
        raise click.ClickException(f"model init needs torch and transformers ({exc}): "
                                   "pip install torch==2.13.0 'tracetrain[trainer]'") from None
    meta = json.loads((path / "tracetrain_model.json").read_text())
    click.echo(f"wrote {path} ({size}, seed {seed}, {meta['params']:,} params, sha256 {folder_digest(path)[:16]})")



@model_group.command("warmup")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A `model init` folder.")
@click.option("--task", required=True,
              help="Tool task of the demonstrations: calc, price, or tools (the demo's: calc +/- and price, 50/50).")
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="Optimiser steps, batch 32 (default 90: an early-stopped warm-up, ~12% greedy calc success "
                   "on the tiny model); the maximum with --stop-at-success (default then 1000).")
@click.option("--stop-at-success", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Stop as soon as greedy multi-turn success on the 128 dev problems reaches this rate (e.g. 0.2).")
@click.option("--eval-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between dev evaluations with --stop-at-success.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed -> identical weights.")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write a warmed copy here (default: replace the weights in --model).")
@click.option("--demos", type=click.IntRange(min=1), default=256, show_default=True,
              help="Number of demonstrations (the first ones of the seeded stream).")
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="Also keep a model folder every this many steps, under --checkpoints (DIR/step-N).")
@click.option("--checkpoints", "checkpoints_dir", default=None, type=click.Path(file_okay=False),
              help="Folder of the --save-every model folders.")
def model_warmup_command(model_dir: str, task: str, steps: int | None, stop_at_success: float | None,
                         eval_every: int, seed: int, lr: float, out: str | None, demos: int,
                         save_every: int | None, checkpoints_dir: str | None) -> None:
    """Short supervised warm-up on a tool task (loss on assistant tokens), so RL starts above zero."""
    try:
        from .warmup import DEFAULT_STEPS, TASKS, save_checkpoint, save_warmed, warmup
    except ImportError as exc:  # pragma: no cover
        raise click.ClickException(f"model warmup needs torch and transformers ({exc})") from None
    if task not in TASKS:
        raise click.UsageError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    if steps is None:
        steps = DEFAULT_STEPS if stop_at_success is None else 1000
    if (save_every is None) != (checkpoints_dir is None):
        raise click.UsageError("--save-every and --checkpoints go together")

    def on_save(step: int, model) -> None:
        save_checkpoint(model, model_dir, Path(checkpoints_dir) / f"step-{step}")

    report = warmup(model_dir, task, steps, seed, lr, stop_at_success=stop_at_success, eval_every=eval_every,
                    n_demos=demos, save_every=save_every, on_save=on_save if save_every else None)
    path = save_warmed(report, model_dir, out)
    success = ""
    if report.dev_success is not None:
        success = ", greedy dev success " + " ".join(f"{k} {v:.1%}" for k, v in report.dev_success.items())
    click.echo(f"warmed {path} on {task}: {report.steps} steps, held-out loss {report.loss_before:.3f} -> "
               f"{report.loss_after:.3f}{success} ({report.seconds:.1f}s)")

@click.command("serve")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default="float32",
              show_default=True, help="float32 makes served logprobs equal the trainer's (~1e-5).")
@click.option("--max-model-len", type=int, default=1024, show_default=True)
@click.option("--max-loras", type=click.IntRange(min=0), default=2, show_default=True,
              help="LoRA adapters served at once; 0 turns LoRA off (full-weight pushes only).")
@click.option("--max-lora-rank", type=int, default=16, show_default=True)
@click.option("--state-file", default=None, help="Policy-version state file (default: a fresh temp file).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for startup.")
def serve_command(model_dir: str, port: int, dtype: str, max_model_len: int, max_loras: int,
                  max_lora_rank: int, state_file: str | None, timeout: float) -> None:
    """Run vLLM's OpenAI server on 127.0.0.1 with LoRA pushes, weight reload and policy versions."""
    from .serving import ServeEnvMissing, ServerStartError, main_loop, start_server
    try:
        handle = start_server(model_dir, port, dtype=dtype, max_model_len=max_model_len, max_loras=max_loras,
                              max_lora_rank=max_lora_rank, state_file=state_file, timeout=timeout)
    except ServeEnvMissing as exc:
        raise click.ClickException(str(exc)) from None
    except ServerStartError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"vLLM ready in {handle.started_s:.1f}s: {handle.openai_base} "
               f"(model '{handle.served_name}'; LoRA pushes appear as 'policy')")
    click.echo(f"policy state file: {handle.state_file}   log: {handle.log_path}")
    click.echo("Ctrl-C to stop.")
    sys.stdout.flush()
    rc = main_loop(handle)
    click.echo("vLLM stopped.")
    sys.exit(rc)
