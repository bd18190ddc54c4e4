"""Collector configuration: one frozen dataclass, four layers.

Precedence, lowest first: the defaults below < the ``[collector]`` table of
``tracetrain.toml`` (current directory, or ``--config FILE``) < environment
variables ``TRACETRAIN_COLLECTOR_<FIELD>`` (upper case) < command-line flags.
Every field's help text below is also its ``--help`` text and its line in
docs/configuration.md (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRACETRAIN_COLLECTOR_"
CONFIG_FILE = "tracetrain.toml"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CollectorConfig:
    """Everything ``tracetrain collector`` can be told."""

    data_dir: str = _f("./tracetrain-data", "Directory of the span store (created if missing).")
    grpc_endpoint: str = _f("127.0.0.1:4317", "host:port for OTLP/gRPC; empty to disable.")
    http_endpoint: str = _f("127.0.0.1:4318", "host:port for OTLP/HTTP, /metrics and /healthz; empty to disable.")
    auth_token: str | None = _f(None, "Bearer token required on every request (gRPC and HTTP) when set.")
    tls_cert_file: str | None = _f(None, "PEM certificate; with tls_key_file, serve TLS on both ports.")
    tls_key_file: str | None = _f(None, "PEM private key for tls_cert_file.")
    writer_id: str | None = _f(None, "Writer id in the data directory (default: first free w0, w1, ...).")
    max_pending_bytes: int = _f(16 << 20, "Wire bytes admitted but not yet committed before refusing (503/UNAVAILABLE).")
    max_request_bytes: int = _f(64 << 20, "Largest request accepted, after decompression (413/RESOURCE_EXHAUSTED).")
    max_value_bytes: int = _f(8 << 20, "Largest single attribute value; a span with a larger one is rejected.")
    fsync: bool = _f(True, "fsync each commit before acknowledging (off: safe against process crashes only).")
    retention_days: float | None = _f(None, "Delete date partitions older than this many days (never, if unset).")
    compact_interval_s: float = _f(30.0, "Seconds between compaction rounds.")
    compact_min_files: int = _f(8, "Merge a partition's files once this writer has at least this many small ones.")
    log_level: str = _f("INFO", "Python logging level.")
    ui: bool = _f(True, "Serve the read-only dashboard at /ui on the HTTP port (guarded by auth_token when set).")

    def __post_init__(self) -> None:
        for name in ("max_pending_bytes", "max_request_bytes", "max_value_bytes", "compact_min_files"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.compact_interval_s <= 0:
            raise ConfigError(f"compact_interval_s must be positive, got {self.compact_interval_s}")
        if self.retention_days is not None and self.retention_days < 0:
            raise ConfigError(f"retention_days must be >= 0, got {self.retention_days}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together")
        if not self.grpc_endpoint and not self.http_endpoint:
            raise ConfigError("at least one of grpc_endpoint and http_endpoint must be set")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def env_var_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _coerce(name: str, raw: Any, annotation: str) -> Any:
    if raw is None:
        return None
    try:
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
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def load_config(
    overrides: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> CollectorConfig:
    """Merge defaults, the TOML file, the environment and ``overrides`` (CLI flags).

    Args:
        overrides: values from flags; None entries mean "not given".
        config_file: explicit TOML path (must exist); else ``./tracetrain.toml`` if present.
        environ: environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(CollectorConfig)}
    values: dict[str, Any] = {}
    path = Path(config_file) if config_file else Path(CONFIG_FILE)
    if config_file or path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        section = document.get("collector", {})
        unknown = set(section) - set(fields)
        if unknown:
            raise ConfigError(f"{path} [collector]: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
        values.update(section)
    for name in fields:
        if env_var_name(name) in environ:
            values[name] = environ[env_var_name(name)]
    for name, value in (overrides or {}).items():
        if value is not None:
            if name not in fields:
                raise ConfigError(f"unknown collector option {name!r}")
            values[name] = value
    coerced = {name: _coerce(name, value, str(fields[name].type)) for name, value in values.items()}
    return CollectorConfig(**coerced)
