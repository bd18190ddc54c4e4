"""Counted, logged-once drops: how code inside an agent fails without hurting it.

Every wrapper catches its own errors and calls ``record_drop(reason)``. The count
tells an operator how much capture was lost; the log line (once per reason, per
process) tells why, without flooding an agent's logs on every LLM call.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

logger = logging.getLogger("tracetrain.instrumentation")

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_logged: set[str] = set()


def record_drop(reason: str, error: BaseException | None = None, amount: int = 1) -> None:
    """Count ``amount`` lost items under ``reason``; log the first occurrence. Never raises."""
    try:
        with _lock:
            _counts[reason] += amount
            first = reason not in _logged
            _logged.add(reason)
        if first:
            detail = f": {type(error).__name__}: {error}" if error is not None else ""
            logger.warning("tracetrain capture: %s%s (the agent is not affected; counted, logged once)",
                           reason, detail, exc_info=error is not None and logger.isEnabledFor(logging.DEBUG))
    except Exception:  # noqa: BLE001 - the last line of defence must not raise either
        pass


def drop_counts() -> dict[str, int]:
    """A snapshot of the drop counters, by reason."""
    with _lock:
        return dict(_counts)


def reset_drop_counts() -> None:
    """Forget counts and logged reasons (tests)."""
    with _lock:
        _counts.clear()
        _logged.clear()
