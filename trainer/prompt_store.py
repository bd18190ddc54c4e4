"""Versioned prompt resources: ``RESOURCES/prompts/<name>/v<N>.json`` plus ``current.json``.

Each version file is immutable and records its lineage (parent version, score, the
episodes critiqued to make it). ``current.json`` is a full copy of the current version
(not just a pointer) so a reader needs one file: ``tracetrain proxy
--system-prompt-file RESOURCES/prompts/<name>/current.json`` reads its ``prompt`` key.
Both are written to a temporary file, fsynced and renamed; a version number is
claimed with an exclusive link, so two writers never publish the same N.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS_DIR = "prompts"
CURRENT_FILE = "current.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_FILE = re.compile(r"^v(\d+)\.json$")


class PromptNotFound(LookupError):
    """No such prompt name or version is published."""


@dataclass(frozen=True)
class PromptVersion:
    """One published prompt and its lineage."""

    name: str
    version: int
    prompt: str
    parent_version: int | None = None
    score: float | None = None                 # mean reward of the evaluation that chose it
    n_evaluated: int | None = None             # episodes behind ``score``
    critiqued_episode_ids: list[str] = field(default_factory=list)
    eval_episode_ids: list[str] = field(default_factory=list)
    critique: str | None = None
    run_id: str | None = None
    created_unix_nano: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError(f"prompt name {name!r} must match {_NAME.pattern} (it names a folder)")
    return name


def prompt_dir(resources_dir: str | os.PathLike, name: str) -> Path:
    return Path(resources_dir) / PROMPTS_DIR / check_name(name)


def versions(resources_dir: str | os.PathLike, name: str) -> list[int]:
    """Published version numbers of ``name``, ascending."""
    directory = prompt_dir(resources_dir, name)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_FILE.match(p.name)))


def _write_tmp(directory: Path, data: dict) -> Path:
    tmp = directory / f".tmp-{os.getpid()}-{time.time_ns()}.json"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def publish(resources_dir: str | os.PathLike, name: str, prompt: str, make_current: bool = True,
            **lineage: Any) -> PromptVersion:
    """Write the next version of ``name`` (and point ``current.json`` at it); returns it.

    ``lineage`` takes the other ``PromptVersion`` fields (parent_version, score, ...).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a prompt must be a non-empty string")
    directory = prompt_dir(resources_dir, name)
    directory.mkdir(parents=True, exist_ok=True)
    number = (versions(resources_dir, name) or [0])[-1] + 1
    while True:
        record = PromptVersion(name=name, version=number, prompt=prompt, created_unix_nano=time.time_ns(), **lineage)
        tmp = _write_tmp(directory, asdict(record))
        try:
            os.link(tmp, directory / f"v{number}.json")  # fails if another writer took the number
            break
        except FileExistsError:
            number += 1
        finally:
            tmp.unlink()
    _fsync_dir(directory)
    if make_current:
        set_current(resources_dir, name, number)
    return record


def set_current(resources_dir: str | os.PathLike, name: str, version: int) -> PromptVersion:
    """Make ``version`` the current one (roll back or forward)."""
    record = load_version(resources_dir, name, version)
    directory = prompt_dir(resources_dir, name)
    os.replace(_write_tmp(directory, asdict(record)), directory / CURRENT_FILE)
    _fsync_dir(directory)
    return record


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> PromptVersion:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptNotFound(f"{path} does not exist") from None
    except ValueError as exc:
        raise PromptNotFound(f"{path} is not valid JSON: {exc}") from None
    known = set(PromptVersion.__dataclass_fields__)
    return PromptVersion(**{k: v for k, v in data.items() if k in known})


def load_version(resources_dir: str | os.PathLike, name: str, version: int | None = None) -> PromptVersion:
    """Version ``version`` of ``name``, or the current one; raises ``PromptNotFound``."""
    directory = prompt_dir(resources_dir, name)
    if version is None:
        return _read(directory / CURRENT_FILE)
    return _read(directory / f"v{int(version)}.json")


def current_prompt(resources_dir: str | os.PathLike, name: str) -> str | None:
    """The current prompt text of ``name``, or None when none is published."""
    try:
        return load_version(resources_dir, name).prompt
    except PromptNotFound:
        return None
