"""``tracetrain apo`` (optimize an agent's system prompt from its traces) and ``tracetrain prompt``.

Settings: apo_config.load_apo_config (defaults < ``[apo]`` in tracetrain.toml < ``TRACETRAIN_APO_*`` < flags).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from tracetrain.trainer import prompt_store
from tracetrain.trainer.apo import RESOURCES_DIR, run_apo
from tracetrain.trainer.apo_config import ApoError, load_apo_config
from tracetrain.trainer.openai_chat import ChatError
from tracetrain.trainer.store import StoreUnavailable


@click.command("apo")
@click.option("--data", "data_dir", default=None, help="The span store. [default ./tracetrain-data]")
@click.option("--critic-url", default=None, help="OpenAI-compatible endpoint of the critic LLM (required).")
@click.option("--critic-model", default=None, help="Critic model name. [default critic]")
@click.option("--critic-api-key", default=None, help="Bearer key for the critic (or TRACETRAIN_APO_CRITIC_API_KEY).")
@click.option("--agent", default=None, help="The agent: module:function (or file.py:function) or a command.")
@click.option("--tasks", default=None, type=click.Path(dir_okay=False), help="Tasks, JSON lines with an \"id\".")
@click.option("--grader", default=None, help="(task, answer) -> reward: module:function or a command.")
@click.option("--rounds", type=int, default=None, help="Critique-and-edit rounds. [default 3]")
@click.option("--candidates", type=int, default=None, help="New prompts evaluated per round. [default 4]")
@click.option("--beam-width", type=int, default=None, help="Best prompts kept as parents. [default 2]")
@click.option("--prompt-name", default=None, help="Name of the prompt resource. [default system]")
@click.option("--resources", "resources_dir", default=None, help="Resources folder. [default DATA/resources]")
@click.option("--initial-prompt", default=None, help="Start from this prompt. [default: the published current one]")
@click.option("--prompt-env", default=None, help="Variable the agent reads its prompt from. [default SYSTEM_PROMPT]")
@click.option("--evaluation", type=click.Choice(["auto", "rollout", "inline"]), default=None,
              help="rollout: tracetrain rollout's runner; inline: call the Python function. [default auto]")
@click.option("--samples-per-task", type=int, default=None, help="Runs per task per prompt. [default 1]")
@click.option("--where", default=None, help="SQL on episodes: stored low-reward episodes to critique too.")
@click.option("--collector", "collector_url", default=None, help="OTLP endpoint for the rollouts' spans.")
@click.option("--run-id", default=None, help="Run id of the train_steps rows. [default apo-<random>]")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="TOML file with an [apo] table. [default ./tracetrain.toml if present]")
def apo_command(config_file: str | None, **flags: Any) -> None:
    """Optimize an agent's system prompt from its traces (APO: critique low-reward runs, edit, evaluate, keep the best).

    Each improvement is published as DATA/resources/prompts/NAME/vN.json (+ current.json)
    and each round is a train_steps row (algo apo). The agent reads the prompt from
    $SYSTEM_PROMPT (or through `tracetrain proxy --system-prompt-file`). See docs/apo.md.

    \b
    tracetrain apo --data ./tracetrain-data --critic-url http://127.0.0.1:8000 --agent my_agent:run \\
        --tasks tasks.jsonl --rounds 3 --candidates 4 --initial-prompt "You are a calculator."
    """
    try:
        cfg = load_apo_config(flags, config_file)
        result = run_apo(cfg, progress=lambda row: click.echo(
            f"round {row['step'] - 1}: best candidate {row['reward_mean']:.4f}, "
            f"current version v{row['policy_version']}", err=True))
    except (ApoError, ChatError, prompt_store.PromptNotFound, StoreUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"run_id": result.run_id, "baseline_score": result.baseline_score,
                           "best_version": result.best.version, "best_score": result.best.score,
                           "prompt": result.best.prompt}, ensure_ascii=False))


@click.command("prompt")
@click.option("--data", "data_dir", default="./tracetrain-data", show_default=True, help="The span store.")
@click.option("--resources", "resources_dir", default=None, help="Resources folder. [default DATA/resources]")
@click.option("--name", default="system", show_default=True, help="Name of the prompt resource.")
@click.option("--version", type=int, default=None, help="A given version instead of the current one.")
@click.option("--set-current", is_flag=True, help="Make --version the current one (roll back or forward).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record (lineage included).")
def prompt_command(data_dir: str, resources_dir: str | None, name: str, version: int | None, set_current: bool,
                   as_json: bool) -> None:
    """Print a published prompt (the current one by default), e.g. SYSTEM_PROMPT="$(tracetrain prompt --name calc)".

    Exits 1 when nothing is published under that name.
    """
    resources = resources_dir or str(Path(data_dir) / RESOURCES_DIR)
    try:
        if set_current:
            if version is None:
                raise click.UsageError("--set-current needs --version")
            record = prompt_store.set_current(resources, name, version)
        else:
            record = prompt_store.load_version(resources, name, version)
    except (prompt_store.PromptNotFound, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(dataclasses.asdict(record), ensure_ascii=False) if as_json else record.prompt)
