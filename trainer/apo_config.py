"""APO settings: ``ApoConfig`` and its layered loader.

Precedence, lowest first: the defaults below < the ``[apo]`` table of ``tracetrain.toml``
(or ``--config FILE``) < ``TRACETRAIN_APO_<FIELD>`` environment variables < flags.
``tracetrain train --algo apo`` hands over its ``TrainConfig``; ``apo_config_from`` takes
the shared fields from it and the rest from the same layers.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracetrain.trainer import prompt_store

EVALUATIONS = ("auto", "rollout", "inline")

class ApoError(ValueError):
    """APO cannot run: missing settings, no starting prompt, no rewards, an unusable critic."""


@dataclass(frozen=True)
class ApoConfig:
    """Everything ``tracetrain apo`` can be told (``tracetrain.toml`` ``[apo]``, ``TRACETRAIN_APO_*``, flags)."""

    data_dir: str = "./tracetrain-data"
    critic_url: str | None = None                 # OpenAI-compatible endpoint of the critic (required)
    critic_model: str = "critic"
    critic_api_key: str | None = None
    agent: Any = None                              # callable, "module:function" or a command (required)
    tasks: Any = None                              # JSON-lines path or a list of task dicts (required)
    grader: Any = None                             # (task, answer) -> reward, when the agent gives none
    rounds: int = 3
    candidates: int = 4                            # new prompts per round
    beam_width: int = 2
    prompt_name: str = "system"
    resources_dir: str | None = None               # default DATA/resources
    initial_prompt: str | None = None              # default: the current published version
    prompt_env: str = "SYSTEM_PROMPT"              # the variable the agent reads its prompt from
    prompt_task_key: str | None = "system_prompt"  # also put the prompt in each task under this key
    evaluation: str = "auto"                       # rollout (run_rollouts), inline (call the function), auto
    samples_per_task: int = 1
    critique_episodes: int = 4                     # low-reward episodes shown to the critic per parent
    where: str | None = None                       # SQL on episodes: also critique these stored episodes
    collector_url: str | None = None               # OTLP endpoint for rollout spans
    success_threshold: float = 1.0
    failure_reward: float = 0.0                    # reward of a crashed / unrewarded run
    timeout_s: float = 300.0                       # per episode
    critic_timeout_s: float = 120.0
    concurrency: int = 4
    store_wait_s: float = 10.0                     # inline: wait this long for emitted rewards to land
    run_id: str | None = None
    agent_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "candidates", "beam_width", "samples_per_task", "critique_episodes", "concurrency"):
            if getattr(self, name) < 1:
                raise ApoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.evaluation not in EVALUATIONS:
            raise ApoError(f"evaluation must be one of {', '.join(EVALUATIONS)}, got {self.evaluation!r}")
        prompt_store.check_name(self.prompt_name)


ENV_PREFIX = "TRACETRAIN_APO_"
CONFIG_FILE = "tracetrain.toml"
SECTION = "apo"


def _coerce(name: str, raw: Any, kind: str) -> Any:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null") and "None" in kind):
        return None
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw if kind == "Any" else str(raw)
    except (TypeError, ValueError) as exc:
        raise ApoError(f"apo setting {name}: {exc}") from None


def load_apo_config(overrides: Mapping[str, Any] | None = None, config_file: str | os.PathLike | None = None,
                    environ: Mapping[str, str] | None = None) -> ApoConfig:
    """Defaults < ``[apo]`` in tracetrain.toml < ``TRACETRAIN_APO_*`` < ``overrides`` (None = not given)."""
    environ = os.environ if environ is None else environ
    kinds = {f.name: str(f.type) for f in dataclasses.fields(ApoConfig)}
    values: dict[str, Any] = {}
    path = Path(config_file) if config_file else Path(CONFIG_FILE)
    if config_file or path.exists():
        try:
            section = tomllib.loads(path.read_text()).get(SECTION, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ApoError(f"cannot read {path}: {exc}") from None
        unknown = set(section) - set(kinds)
        if unknown:
            raise ApoError(f"{path} [{SECTION}]: unknown keys {sorted(unknown)}; known: {sorted(kinds)}")
        values.update(section)
    for name in kinds:
        if ENV_PREFIX + name.upper() in environ:
            values[name] = environ[ENV_PREFIX + name.upper()]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ApoConfig(**{k: _coerce(k, v, kinds[k]) for k, v in values.items()})


def apo_config_from(cfg: Any) -> ApoConfig:
    """An ``ApoConfig`` from itself, or from the training loop's ``TrainConfig`` plus ``[apo]``/env settings."""
    if isinstance(cfg, ApoConfig):
        return cfg
    overrides = {"data_dir": getattr(cfg, "data_dir", None), "where": getattr(cfg, "where", None),
                 "run_id": getattr(cfg, "run_id", None),
                 "success_threshold": getattr(cfg, "success_threshold", None),
                 "agent_name": (getattr(cfg, "agents", None) or (None,))[0]}
    return load_apo_config(overrides)
