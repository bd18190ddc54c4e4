"""tracetrain.instrumentation: the code that runs inside agents.

Public API (imported lazily, so ``import tracetrain.instrumentation.semconv``, which
the collector and trainer do, costs nothing more):

* ``emit_reward(value, name=None, **attrs)``: a reward in the current episode;
* ``episode(task_id=..., episode_id=None, rollout_id=None, agent_name=None)``: a
  context manager running one episode as its own trace;
* ``drop_counts()``: what capture lost, by reason (it never raises into the agent).

Zero-code capture needs none of these: ``tracetrain run -- python agent.py``, or
``opentelemetry-instrument python agent.py`` with tracetrain installed (docs/capture.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Episode", "current_episode", "drop_counts", "emit_reward", "episode"]

_LAZY = {"Episode": "rewards", "current_episode": "rewards", "emit_reward": "rewards", "episode": "rewards",
         "drop_counts": "drops"}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
