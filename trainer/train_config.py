"""``tracetrain train`` configuration: one frozen dataclass, four layers.

Precedence, lowest first: the defaults below < the ``[train]`` table of ``tracetrain.toml``
(current directory, or ``--config FILE``) < environment variables
``TRACETRAIN_TRAIN_<FIELD>`` (upper case; lists comma-separated) < command-line flags.
Every field's help text is also its line in docs/configuration.md (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRACETRAIN_TRAIN_"
CONFIG_FILE = "tracetrain.toml"
SECTION = "train"
ALGOS = ("grpo", "ppo", "sft", "apo")


class TrainConfigError(ValueError):
    """A training setting is missing, malformed or out of range."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``tracetrain train`` can be told."""

    data_dir: str = _f("./tracetrain-data", "Span store to read episodes from and write train_steps/checkpoints rows to.")
    model_dir: str | None = _f(None, "Hugging Face model folder to start from (required).")
    algo: str = _f("grpo", "Algorithm: grpo, ppo, sft or apo (apo runs trainer/apo.py).")
    serve_url: str | None = _f(None, "vLLM server to push each new policy to (none: no push).")
    serve_state_file: str | None = _f(None, "The vLLM server's policy-version state file (default: the run's own).")
    online: bool = _f(False, "Poll the store for new episodes and train as batches fill, until max_steps or a signal.")
    where: str | None = _f(None, "SQL condition over the episodes view selecting episodes (e.g. reward IS NOT NULL).")
    agents: tuple[str, ...] = _f((), "Train only these agents' calls; with LoRA, one adapter per agent.")
    lora: bool = _f(False, "Train LoRA adapters (true) or every weight (false).")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha (scale alpha / r).")
    lr: float | None = _f(None, "AdamW learning rate (default 2e-4 full fine-tuning, 1e-3 LoRA).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta2: float = _f(0.99, "AdamW beta2 (beta1 is 0.9).")
    group_size: int = _f(8, "GRPO: episodes per task in a group; a batch holds only complete groups.")
    batch_episodes: int = _f(64, "Episodes per optimizer step (the batch), at least one group.")
    epochs: int = _f(1, "Passes over each batch per step (PPO epochs).")
    minibatches: int = _f(2, "Optimizer updates per epoch (the batch is split into this many).")
    grad_clip: float = _f(1.0, "Clip the gradient norm to this (0: off).")
    max_steps: int | None = _f(None, "Stop after this many steps in total (offline default: one pass over the data).")
    data_epochs: int = _f(1, "Offline: passes over the selected episodes.")
    max_staleness: int | None = _f(None, "Drop calls whose policy version lags the current one by more (none: keep all).")
    clip_eps: float = _f(0.2, "PPO ratio clip epsilon.")
    dual_clip_c: float | None = _f(3.0, "Dual-clip cap on the importance ratio for negative advantages (none: off).")
    kl_beta: float = _f(0.0, "Weight of the k3 KL to the starting policy (0: no reference model).")
    max_len: int | None = _f(None, "Drop transitions longer than this many tokens (none: no limit).")
    success_threshold: float = _f(1.0, "An episode counts as a success when its reward is at least this.")
    run_id: str | None = _f(None, "Run id (default: a new one; reuse one to resume it).")
    out_dir: str | None = _f(None, "Checkpoints and run state (default ./tracetrain-runs/<run_id>).")
    checkpoint_every: int = _f(1, "Checkpoint every this many steps and at the end (a restart re-trains the steps after the last one).")
    keep_checkpoints: int = _f(3, "Checkpoints kept on disk (older ones are deleted).")
    poll_interval_s: float = _f(2.0, "Online: seconds between store polls while waiting for a batch.")
    seed: int = _f(0, "Seed of torch and of the batch order.")
    threads: int | None = _f(None, "torch CPU threads (none: torch's default).")

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise TrainConfigError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        for name in ("group_size", "batch_episodes", "epochs", "minibatches", "data_epochs", "lora_r", "checkpoint_every",
                     "lora_alpha"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "threads", "max_len"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise TrainConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.lr is not None and self.lr < 0:
            raise TrainConfigError(f"lr must be >= 0, got {self.lr}")
        if self.algo in ("grpo",) and self.batch_episodes < self.group_size:
            raise TrainConfigError(f"batch_episodes ({self.batch_episodes}) must hold at least one group "
                                   f"(group_size {self.group_size})")
        if self.poll_interval_s <= 0 or self.grad_clip < 0 or self.kl_beta < 0:
            raise TrainConfigError("poll_interval_s must be > 0, grad_clip and kl_beta >= 0")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.lora else 2e-4


def env_var_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _coerce(name: str, raw: Any, annotation: str) -> Any:
    if raw is None:
        return None
    try:
        if annotation.startswith("tuple"):
            if isinstance(raw, str):
                return tuple(x.strip() for x in raw.split(",") if x.strip())
            return tuple(str(x) for x in raw)
        if isinstance(raw, str) and raw.strip().lower() in ("", "none", "null") and "None" in annotation:
            return None
        if annotation.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if annotation.startswith("int"):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"not an integer: {raw!r}")
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"{name}: {exc}") from None


def load_train_config(overrides: Mapping[str, Any] | None = None, config_file: str | os.PathLike | None = None,
                      environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Merge defaults, the ``[train]`` TOML table, ``TRACETRAIN_TRAIN_*`` and ``overrides`` (flags).

    Args:
        overrides: values from flags; None entries (and empty tuples) mean "not given".
        config_file: explicit TOML path (must exist); else ``./tracetrain.toml`` if present.
        environ: environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    path = Path(config_file) if config_file else Path(CONFIG_FILE)
    if config_file or path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainConfigError(f"cannot read {path}: {exc}") from None
        section = document.get(SECTION, {})
        unknown = set(section) - set(fields)
        if unknown:
            raise TrainConfigError(f"{path} [{SECTION}]: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
        values.update(section)
    for name in fields:
        if env_var_name(name) in environ:
            values[name] = environ[env_var_name(name)]
    for name, value in (overrides or {}).items():
        if value is None or value == ():
            continue
        if name not in fields:
            raise TrainConfigError(f"unknown train option {name!r}")
        values[name] = value
    coerced = {name: _coerce(name, value, str(fields[name].type)) for name, value in values.items()}
    return TrainConfig(**coerced)
