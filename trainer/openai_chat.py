"""A minimal client of an OpenAI-compatible ``/v1/chat/completions`` endpoint (standard library only).

Used by the LLM judge (rewards.py) and the APO critic (apo.py). It retries what can
succeed later (429, 502, 503, 504, connection errors, timeouts) with capped backoff,
and raises ``ChatError`` with the endpoint's own message for everything else, so a
wrong URL, model or key reads as one clear line, not a traceback.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


class ChatError(RuntimeError):
    """The endpoint could not be reached, refused the request, or answered something unreadable."""


def chat_url(base_url: str) -> str:
    """``http://host:port[/v1]`` (an OpenAI ``base_url``) -> the chat completions URL."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def chat_completion(base_url: str, model: str, messages: list[dict[str, Any]], api_key: str | None = None,
                    timeout_s: float = 60.0, attempts: int = 3, **params: Any) -> str:
    """Send one chat request and return the first choice's text.

    Args:
        base_url: the endpoint, e.g. ``http://127.0.0.1:8000`` or ``.../v1``.
        model: the model name the endpoint serves.
        messages: OpenAI chat messages.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout_s: per attempt.
        attempts: tries in all, for retryable failures.
        **params: extra request fields (``temperature``, ``max_tokens``...).

    Raises:
        ChatError: unreachable after ``attempts``, a non-retryable HTTP error, or no text in the answer.
    """
    url = chat_url(base_url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps({"model": model, "messages": messages, **params}).encode()
    delay_s = 0.5
    last = ""
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return _first_text(url, response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")[:500]
            last = f"HTTP {exc.code} from {url}: {_error_message(body)}"
            if exc.code not in RETRYABLE_STATUS:
                raise ChatError(last) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"cannot reach {url}: {reason}"
        if attempt < attempts - 1:
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 8.0)
    raise ChatError(f"{last} (after {attempts} attempts)")


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or body)
    except (ValueError, AttributeError):
        return body


def _first_text(url: str, raw: bytes) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ChatError(f"{url} answered something that is not a chat completion: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise ChatError(f"{url} answered a chat completion without text content: {raw[:200]!r}")
    return content
