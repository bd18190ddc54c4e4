"""Environment variables read by the code that runs inside agents.

Each one is a constant with its meaning, so docs/capture.md and the code name the
same thing. Standard ``OTEL_*`` variables are honoured as they are, never duplicated.
"""

from __future__ import annotations

import os
from typing import Final

TRACETRAIN_CAPTURE_TOKEN_IDS: Final = "TRACETRAIN_CAPTURE_TOKEN_IDS"
"""``true`` (default) or ``false``. When false the OpenAI-client instrumentor adds nothing
to requests (no ``return_token_ids``, no ``logprobs``); ids the caller asked for itself
are still recorded."""

TRACETRAIN_POLICY_VERSION: Final = "TRACETRAIN_POLICY_VERSION"
"""Integer policy version recorded on LLM spans when the response carries no
``x-tracetrain-policy-version`` header (e.g. a rollout worker pinned to one checkpoint)."""

TRACETRAIN_EPISODE_ID: Final = "TRACETRAIN_EPISODE_ID"
"""Set by ``tracetrain run`` for the child: the episode id it put in the resource."""
TRACETRAIN_TASK_ID: Final = "TRACETRAIN_TASK_ID"
"""Set by ``tracetrain run`` for the child: the task id it put in the resource."""
TRACETRAIN_ROLLOUT_ID: Final = "TRACETRAIN_ROLLOUT_ID"
"""Set by ``tracetrain run`` for the child: the rollout id it put in the resource."""

OTEL_GENAI_CAPTURE_MESSAGE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""OTel's switch for message content (``SPAN_ONLY``, ``SPAN_AND_EVENT``...); tracetrain's own
LLM spans record messages when it names spans. The distro defaults it to ``SPAN_ONLY``."""
TRACELOOP_TRACE_CONTENT: Final = "TRACELOOP_TRACE_CONTENT"
"""Traceloop's switch for message content; the distro defaults it to ``true``."""

_FALSE = {"0", "false", "no", "off"}


def capture_token_ids_enabled() -> bool:
    """Whether requests may be augmented (read per call: tests and agents may toggle it)."""
    return os.environ.get(TRACETRAIN_CAPTURE_TOKEN_IDS, "true").strip().lower() not in _FALSE


def message_content_enabled() -> bool:
    """Whether tracetrain's own GenAI spans record message content."""
    value = os.environ.get(OTEL_GENAI_CAPTURE_MESSAGE_CONTENT, "").strip().upper()
    return value in {"SPAN_ONLY", "SPAN_AND_EVENT", "TRUE"}


def policy_version_from_env() -> int | None:
    """TRACETRAIN_POLICY_VERSION as an int, or None when unset or not an integer."""
    return parse_int(os.environ.get(TRACETRAIN_POLICY_VERSION))


def parse_int(value: str | None) -> int | None:
    """An integer header or env value, or None (never raises)."""
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None
