"""``tracetrain proxy --system-prompt-file``: put a registered system prompt into chat requests.

The file is plain text (the whole file is the prompt) or JSON with a ``"prompt"`` string,
such as the ``current.json`` of a prompt resource APO publishes
(``DATA/resources/prompts/<name>/current.json``). It is re-read when it changes: each
request compares one ``stat`` (mtime, size, inode) with the last read, so an atomic
rename of a new version takes effect on the next request. A missing or unreadable file
never fails a call: the last good prompt stays in use (none at first: requests pass
unchanged), and the problem is logged once per distinct error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read_prompt_file(path: Path) -> str:
    """The prompt in ``path``: a JSON object's ``prompt`` string, else the whole text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            if not isinstance(data.get("prompt"), str):
                raise ValueError(f"{path} is JSON without a \"prompt\" string")
            return data["prompt"]
    return text.rstrip("\n")


def with_system_prompt(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    """A copy of a chat request whose first system message says ``prompt`` (inserted first if none)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    messages = list(messages)
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "system":
            messages[index] = {**message, "content": prompt}
            break
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return {**body, "messages": messages}


class SystemPromptFile:
    """The prompt in a file, re-read when the file changes (one ``stat`` per call)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._prompt: str | None = None
        self._last_error: str | None = None

    def current(self) -> str | None:
        """The prompt to use now (None: no usable prompt yet)."""
        try:
            st = self.path.stat()
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key == self._key:
                return self._prompt
            prompt = read_prompt_file(self.path)
        except (OSError, ValueError) as exc:
            self._report(f"cannot read --system-prompt-file {self.path}: {exc}")
            return self._prompt
        with self._lock:
            if key != self._key:
                self._key, self._prompt, self._last_error = key, prompt, None
                logger.info("system prompt loaded from %s (%d characters)", self.path, len(prompt))
        return self._prompt

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = self.current()
        return body if prompt is None else with_system_prompt(body, prompt)

    def _report(self, message: str) -> None:
        if message != self._last_error:
            self._last_error = message
            logger.warning("%s; %s", message, "keeping the last prompt" if self._prompt is not None
                           else "requests pass unchanged")
