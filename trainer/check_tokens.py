"""`tracetrain check-tokens`: does re-tokenizing captured calls give the captured ids?

The trainer trains on the token ids the server actually used (captured in
``prompt_token_ids`` / ``response_token_ids``), never on a re-tokenization. This
command measures how far a re-tokenization would have drifted: for every captured
call it renders the stored messages with the model's tokenizer and chat template
(``add_generation_prompt=True``, as vLLM does) and compares with the captured
prompt ids, and re-encodes the output text and compares with the response ids.

It reads the span store's Parquet files directly (the tables are the interface
between collector and trainer) and needs transformers only when it runs.

Exit status: 0 when every checked call matches, 1 when any differs, 2 on an error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import duckdb

from tracetrain.instrumentation import semconv as sc
from tracetrain.trainer import store
from tracetrain.trainer.tokenizer_chat import (
    TokenizerUnavailable,
    chat_messages,
    load_tokenizer,
    output_text,
    prompt_text,
    render_prompt_ids,
    tool_definitions,
)

WINDOW_TOKENS = 4
"""Ids shown on each side of the first difference."""


class CheckTokensError(click.ClickException):
    """An error that stops the check (exit 2, apart from 1 = "mismatches found")."""

    exit_code = 2


@dataclass
class IdComparison:
    """Captured ids against re-tokenized ids."""

    match: bool
    captured_len: int
    rendered_len: int
    first_difference: int | None = None
    captured_window: list[int] = field(default_factory=list)
    rendered_window: list[int] = field(default_factory=list)

    def describe(self) -> str:
        if self.match:
            return f"{self.captured_len} ids match"
        k = self.first_difference
        return (f"first difference at token {k} (captured {self.captured_len} ids, re-tokenized "
                f"{self.rendered_len}): captured …{self.captured_window}… vs …{self.rendered_window}…")


def compare_ids(captured: list[int], rendered: list[int]) -> IdComparison:
    """Where two id sequences first differ (a length difference counts, at the shorter length)."""
    if captured == rendered:
        return IdComparison(True, len(captured), len(rendered))
    k = next((i for i, (a, b) in enumerate(zip(captured, rendered)) if a != b), min(len(captured), len(rendered)))
    lo = max(0, k - WINDOW_TOKENS)
    return IdComparison(False, len(captured), len(rendered), k, list(captured[lo:k + WINDOW_TOKENS]),
                        list(rendered[lo:k + WINDOW_TOKENS]))


@dataclass
class CallCheck:
    """The verdict on one captured call."""

    trace_id: str
    span_id: str
    name: str
    prompt: IdComparison | None = None
    response: IdComparison | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def mismatch(self) -> bool:
        return any(c is not None and not c.match for c in (self.prompt, self.response))


# ---------------------------------------------------------------- the store


def load_calls(data_dir: str | Path, where: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Captured calls (with prompt token ids), oldest first, filtered by a SQL ``where``."""
    data_dir = Path(data_dir)
    if not (data_dir / "spans").is_dir():
        raise CheckTokensError(f"{data_dir} is not a tracetrain span store (no spans/ folder)")
    if not any((data_dir / "spans").glob("*/*/part-*.parquet")) and \
            not any((data_dir / "spans").glob("*/*/compact-*.parquet")):
        return []
    sql = f"SELECT * FROM {sc.VIEW_LLM_CALLS} WHERE {sc.COL_PROMPT_TOKEN_IDS} IS NOT NULL"
    if where:
        sql += f" AND ({where})"
    sql += f" ORDER BY {sc.COL_START_NS}, {sc.COL_SPAN_ID}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    try:
        con = store.connect(data_dir)
    except store.StoreUnavailable as exc:
        raise CheckTokensError(str(exc)) from None
    try:
        return store.retry_listing(lambda: con.sql(sql).to_arrow_table().to_pylist())
    except duckdb.Error as exc:
        raise CheckTokensError(f"cannot read calls: {exc}") from None
    finally:
        con.close()


# ---------------------------------------------------------------- checking


def _strip_trailing_special(ids: list[int], special: set[int]) -> list[int]:
    """Response ids without the end-of-turn tokens the server hides from the text."""
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return ids[:end]


def check_call(row: dict[str, Any], tokenizer: Any, template_kwargs: dict[str, Any]) -> CallCheck:
    """Re-tokenize one call's prompt and response and compare with what was captured."""
    check = CallCheck(row[sc.COL_TRACE_ID], row[sc.COL_SPAN_ID], row[sc.COL_NAME] or "")
    try:
        if row["operation"] == "text_completion":
            text = prompt_text(row[sc.COL_INPUT_MESSAGES])
            rendered = tokenizer.encode(text, add_special_tokens=True) if text is not None else None
            if rendered is None:
                check.skipped.append("prompt: sent as token ids, no text to re-tokenize")
        else:
            chat = chat_messages(row[sc.COL_INPUT_MESSAGES], row[sc.COL_SYSTEM_INSTRUCTIONS])
            tools = tool_definitions(row[sc.COL_ATTRIBUTES])
            rendered = render_prompt_ids(tokenizer, chat, tools, template_kwargs) if chat else None
            if rendered is None:
                check.skipped.append("prompt: no input messages captured")
        if rendered is not None:
            check.prompt = compare_ids(list(row[sc.COL_PROMPT_TOKEN_IDS]), list(rendered))
    except Exception as exc:  # a template that rejects these messages is a finding, not a crash
        check.skipped.append(f"prompt: could not render ({type(exc).__name__}: {exc})")
    response_ids = row[sc.COL_RESPONSE_TOKEN_IDS]
    text, reason = output_text(row[sc.COL_OUTPUT_MESSAGES])
    if response_ids is None:
        check.skipped.append("response: no response ids captured")
    elif reason is not None:
        check.skipped.append(f"response: {reason}")
    else:
        captured = _strip_trailing_special(list(response_ids), set(getattr(tokenizer, "all_special_ids", [])))
        check.response = compare_ids(captured, tokenizer.encode(text, add_special_tokens=False))
    return check


def format_check(check: CallCheck) -> str:
    parts = [f"{label}: {c.describe()}" for label, c in (("prompt", check.prompt), ("response", check.response))
             if c is not None]
    verdict = "MISMATCH" if check.mismatch else "ok"
    return f"{verdict:8} {check.trace_id}/{check.span_id} {check.name}  " + "; ".join(parts or ["nothing compared"])


def summarize(checks: list[CallCheck]) -> str:
    prompt_bad = sum(1 for c in checks if c.prompt is not None and not c.prompt.match)
    response_bad = sum(1 for c in checks if c.response is not None and not c.response.match)
    compared_prompts = sum(1 for c in checks if c.prompt is not None)
    compared_responses = sum(1 for c in checks if c.response is not None)
    skipped = sum(len(c.skipped) for c in checks)
    mismatched = sum(1 for c in checks if c.mismatch)
    return (f"check-tokens: {len(checks)} calls, {len(checks) - mismatched} match, {mismatched} mismatch "
            f"(prompts {compared_prompts - prompt_bad}/{compared_prompts} match, "
            f"responses {compared_responses - response_bad}/{compared_responses} match, {skipped} checks skipped)")


@click.command("check-tokens")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default="./tracetrain-data",
              show_default=True, help="Directory of the span store.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Local model or tokenizer directory (tokenizer files and chat template).")
@click.option("--where", default=None,
              help="SQL filter over llm_calls columns, e.g. \"model = 'qwen' AND episode_id = 'ep-1'\".")
@click.option("--limit", type=int, default=None, help="Check at most this many calls (oldest first).")
@click.option("--chat-template-kwargs", "template_kwargs_json", default="{}", show_default=True,
              help="JSON object passed to the chat template, as vLLM's chat_template_kwargs "
                   "(e.g. '{\"enable_thinking\": false}').")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: one line per mismatch and a summary; json: one object per call.")
@click.option("--all", "show_all", is_flag=True, help="text format: also list calls that match.")
def check_tokens_command(data_dir: str, model_dir: str, where: str | None, limit: int | None,
                         template_kwargs_json: str, output_format: str, show_all: bool) -> None:
    """Re-tokenize captured LLM calls with the model's tokenizer and report drift.

    For each call in llm_calls with prompt token ids, renders its input messages
    with the chat template (generation prompt added) and compares with the
    captured prompt ids, and re-encodes the output text against the response ids.
    Exit status 0 when all match, 1 when any call differs, 2 on an error.
    """
    try:
        template_kwargs = json.loads(template_kwargs_json)
    except ValueError as exc:
        raise click.UsageError(f"--chat-template-kwargs is not JSON: {exc}") from None
    if not isinstance(template_kwargs, dict):
        raise click.UsageError("--chat-template-kwargs must be a JSON object")
    try:
        tokenizer = load_tokenizer(model_dir)
    except TokenizerUnavailable as exc:
        raise CheckTokensError(str(exc)) from None
    checks = [check_call(row, tokenizer, template_kwargs) for row in load_calls(data_dir, where, limit)]
    for check in checks:
        if output_format == "json":
            click.echo(json.dumps({**asdict(check), "mismatch": check.mismatch}))
        elif show_all or check.mismatch:
            click.echo(format_check(check))
    click.echo(summarize(checks) if checks else f"check-tokens: no captured calls with prompt token ids in {data_dir}",
               err=output_format == "json")
    if any(check.mismatch for check in checks):
        click.get_current_context().exit(1)
