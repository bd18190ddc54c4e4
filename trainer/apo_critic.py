"""The APO critic: a textual gradient (critique) of a prompt from failed episodes, then N edits.

Two chat calls to an OpenAI-compatible endpoint per parent prompt: the critique ("what in
this prompt makes these runs fail, and what should it say"), then, in the same
conversation, ``k`` rewritten prompts, each between ``<prompt>`` and ``</prompt>`` (a JSON
``{"prompts": [...]}`` answer is accepted too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tracetrain.trainer.openai_chat import chat_completion

CRITIC_SYSTEM = (
    "You improve the system prompt of an AI agent. You are shown the current system prompt and runs of "
    "the agent that got a low reward. Explain concisely what in the prompt leads to these failures and what "
    "the prompt should say instead. Do not write the new prompt yet.")
EDIT_REQUEST = (
    "Now write {k} different improved system prompts that fix these problems. Put each complete prompt "
    "between <prompt> and </prompt>, and nothing else inside those tags.")
_PROMPT_TAG = re.compile(r"<prompt>(.*?)</prompt>", re.DOTALL | re.IGNORECASE)


class CriticOutputError(ValueError):
    """The critic answered no usable prompt."""


@dataclass(frozen=True)
class FailedRun:
    """One low-reward run shown to the critic."""

    episode_id: str
    reward: float | None
    transcript: str


@dataclass(frozen=True)
class Proposal:
    critique: str
    prompts: list[str]


def parse_prompts(text: str) -> list[str]:
    """Prompts in a critic answer: ``<prompt>…</prompt>`` blocks, else JSON ``{"prompts": [...]}``; deduplicated."""
    found = [p.strip() for p in _PROMPT_TAG.findall(text)]
    if not found:
        try:
            data: Any = json.loads(text.strip().removeprefix("```json").removesuffix("```"))
            found = [str(p).strip() for p in (data.get("prompts") if isinstance(data, dict) else data) or []]
        except (ValueError, AttributeError, TypeError):
            found = []
    out: list[str] = []
    for prompt in found:
        if prompt and prompt not in out:
            out.append(prompt)
    return out


def _runs_text(runs: list[FailedRun]) -> str:
    blocks = [f"### Run {i} (episode {run.episode_id}, reward {run.reward})\n{run.transcript}"
              for i, run in enumerate(runs, 1)]
    return "\n\n".join(blocks) if blocks else "(no failed runs recorded)"


def propose(base_url: str, model: str, prompt: str, runs: list[FailedRun], k: int, api_key: str | None = None,
            timeout_s: float = 120.0) -> Proposal:
    """Critique ``prompt`` against ``runs`` and return up to ``k`` new prompts (raises CriticOutputError on none)."""
    messages = [{"role": "system", "content": CRITIC_SYSTEM},
                {"role": "user", "content": f"Current system prompt:\n<current>\n{prompt}\n</current>\n\n"
                                            f"Runs with a low reward:\n\n{_runs_text(runs)}"}]
    critique = chat_completion(base_url, model, messages, api_key=api_key, timeout_s=timeout_s, temperature=0.7)
    messages += [{"role": "assistant", "content": critique},
                 {"role": "user", "content": EDIT_REQUEST.format(k=k)}]
    answer = chat_completion(base_url, model, messages, api_key=api_key, timeout_s=timeout_s, temperature=0.9)
    prompts = [p for p in parse_prompts(answer) if p != prompt][:k]
    if not prompts:
        raise CriticOutputError(f"the critic gave no new prompt in <prompt>...</prompt> tags: {answer[:200]!r}")
    return Proposal(critique, prompts)
