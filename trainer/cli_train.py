"""`tracetrain train` and `tracetrain plot` (entry points in the ``tracetrain.cli`` group).

Every ``TrainConfig`` field is a flag (its help text is the field's), so the CLI, the TOML
``[train]`` table, the ``TRACETRAIN_TRAIN_*`` variables and docs/configuration.md name the
same settings. torch is imported only when a command runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click

from .train_config import ALGOS, TrainConfig, TrainConfigError, load_train_config

# fields whose flag is not simply --<field-name>
_FLAG_NAMES = {"data_dir": "--data", "model_dir": "--model", "out_dir": "--out", "agents": "--agent"}


def flag_name(field_name: str) -> str:
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _option(f: dataclasses.Field) -> Any:
    help_text = f.metadata["help"]
    kind = str(f.type)
    if f.name == "algo":
        return click.option("--algo", type=click.Choice(ALGOS), default=None, help=help_text)
    if f.name == "online":
        return click.option("--online/--offline", default=None, help=help_text)
    if f.name == "lora":
        return click.option("--lora/--full", default=None, help=help_text)
    if f.name == "agents":
        return click.option("--agent", "agents", multiple=True, help=help_text + " Repeat for several.")
    if kind.startswith("bool"):
        return click.option(flag_name(f.name) + "/--no-" + f.name.replace("_", "-"), f.name, default=None,
                            help=help_text)
    click_type = int if kind.startswith("int") else float if kind.startswith("float") else str
    return click.option(flag_name(f.name), f.name, type=click_type, default=None, help=help_text)


def _with_config_options(fn: Any) -> Any:
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = _option(f)(fn)
    return fn


@click.command("train", context_settings={"max_content_width": 120})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with a [train] table (default ./tracetrain.toml if present).")
@_with_config_options
def train_command(config_file: str | None, **options: Any) -> None:
    """Train the model on episodes from the span store (GRPO, PPO, SFT; APO), offline or --online.

    Reads only the span tables, builds token-level transitions, trains, checkpoints, pushes
    the new policy to vLLM (--serve-url) and records one train_steps row per step.
    Examples:

      tracetrain train --data DATA --model models/tiny --algo grpo --max-steps 20

      tracetrain train --data DATA --model models/tiny --online --serve-url http://127.0.0.1:8000 --lora
    """
    try:
        cfg = load_train_config(options, config_file)
    except TrainConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not cfg.model_dir and cfg.algo != "apo":
        raise click.UsageError("--model is required (a Hugging Face model folder, e.g. from `tracetrain model init`)")
    if cfg.algo == "apo":
        _run_apo(cfg)
        return
    _run_train(cfg)


def _run_apo(cfg: TrainConfig) -> None:
    try:
        from . import apo  # written by the APO work; optional
    except ImportError as exc:
        raise click.ClickException(f"--algo apo needs tracetrain.trainer.apo, which is not available here ({exc})")
    if not hasattr(apo, "run_apo"):
        raise click.ClickException("tracetrain.trainer.apo has no run_apo(cfg)")
    known = tuple(e for e in (getattr(apo, "ApoError", None), getattr(apo, "ChatError", None)) if isinstance(e, type))
    try:
        result = apo.run_apo(cfg)
    except known + (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if result is not None:
        click.echo(str(result))


def _run_train(cfg: TrainConfig) -> None:
    try:
        from .store import StoreUnavailable
        from .train_loop import NothingToTrain, train
    except ImportError as exc:  # pragma: no cover - a broken install
        raise click.ClickException(f"training needs torch, transformers and peft ({exc}): "
                                   "pip install torch==2.13.0 'tracetrain[model]'") from None
    if len(cfg.agents) > 1 and not cfg.lora:
        click.echo(f"note: {len(cfg.agents)} agents with full fine-tuning train ONE shared policy; "
                   "use --lora for one adapter per agent", err=True)
    try:
        report = train(cfg)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except NothingToTrain as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(json.dumps({"run_id": report.run_id, "steps": report.steps_done, "last_step": report.last_step,
                           "policy_version": report.policy_version, "checkpoint": report.checkpoint,
                           "stop_reason": report.stop_reason, "skipped": dict(report.skipped)}))


# ---------------------------------------------------------------- plot

PLOTTED = (("reward_mean", "reward (batch mean)"), ("success_rate", "success rate"), ("loss", "loss"),
           ("kl", "KL to reference"))


def plot_steps(rows: list[dict[str, Any]], out: str) -> None:
    """2x2 curves per step (one line per run and agent) into ``out`` (PNG, SVG, PDF by extension)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = r["run_id"] + (f" / {r['agent_name']}" if r.get("agent_name") else "")
        series.setdefault(label, []).append(r)
    for ax, (column, title) in zip(axes.flat, PLOTTED):
        for label, points in series.items():
            xs = [p["step"] for p in points if p[column] is not None]
            ys = [p[column] for p in points if p[column] is not None]
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        if not any(p[column] is not None for points in series.values() for p in points):
            ax.text(0.5, 0.5, "not computed" + (" (--kl-beta 0)" if column == "kl" else ""), ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


@click.command("plot")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Span store holding the train_steps table.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Image to write (.png, .svg, .pdf).")
@click.option("--run-id", default=None, help="Plot only this run (default: every run).")
def plot_command(data_dir: str, out: str, run_id: str | None) -> None:
    """Plot reward mean, success rate, loss and KL per training step from the train_steps table."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("tracetrain plot needs matplotlib: pip install 'tracetrain[trainer]'") from None
    from .store import StoreUnavailable, connect
    try:
        con = connect(data_dir)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        sql = ("SELECT run_id, agent_name, step, reward_mean, success_rate, loss, kl FROM train_steps "
               "WHERE run_id IS NOT NULL" + (" AND run_id = ?" if run_id else "") + " ORDER BY run_id, agent_name, step")
        cursor = con.execute(sql, [run_id] if run_id else [])
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor.fetchall()]
    finally:
        con.close()
    if not rows:
        raise click.ClickException(f"no train_steps rows in {data_dir}" + (f" for run {run_id!r}" if run_id else "")
                                   + ": run `tracetrain train` first")
    plot_steps(rows, out)
    runs = sorted({r["run_id"] for r in rows})
    click.echo(f"wrote {out}: {len(rows)} steps of {len(runs)} run(s) ({', '.join(runs)})", err=False)
    sys.stdout.flush()
