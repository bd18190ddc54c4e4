"""``tracetrain score``: compute rewards from the spans of stored episodes, optionally store them.

A thin skin over ``tracetrain.trainer.rewards``: pick a reward function (``--fn``,
``--sql``, ``--judge-url``, ``--verify-key``, ``--tool-error-penalty``; several are
added up, SQL stands alone), score the episodes ``--where`` selects, print
``{"episode_id", "reward"}`` JSON lines, and with ``--post`` store them in the collector
as delayed rewards (idempotent: a re-run stores nothing new).
"""

from __future__ import annotations

import json
import sys

import click
from tracetrain.trainer import rewards as rw
from tracetrain.trainer.episode_view import episode_ids_in_store
from tracetrain.trainer.reward_post import post_rewards
from tracetrain.trainer.store import StoreUnavailable, connect


def _reward_function(fn: str | None, sql: str | None, judge_url: str | None, judge_model: str, rubric: str,
                     judge_api_key: str | None, judge_max_score: float, verify_key: str | None,
                     penalty: float | None):
    if sql and any((fn, judge_url, verify_key, penalty is not None)):
        raise click.UsageError("--sql gives the rewards by itself; do not combine it with other reward options")
    if sql:
        return sql if rw.is_sql(sql) else rw.SQL_PREFIX + sql
    parts = []
    if fn:
        try:
            loaded = rw.load_object(fn)
        except rw.RewardError as exc:
            raise click.UsageError(f"--fn: {exc}") from None
        if not callable(loaded):
            raise click.UsageError(f"--fn {fn!r} is not callable")
        parts.append(loaded)
    if verify_key:
        parts.append(rw.final_answer_verifier(verify_key))
    if penalty is not None:
        parts.append(rw.tool_error_penalty(penalty))
    if judge_url:
        parts.append(rw.llm_judge(judge_url, judge_model, rubric, api_key=judge_api_key, max_score=judge_max_score))
    if not parts:
        raise click.UsageError("give a reward: --fn, --sql, --judge-url, --verify-key or --tool-error-penalty")
    return parts[0] if len(parts) == 1 else rw.combine(*parts)


@click.command("score")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="The span store (the collector's --data directory).")
@click.option("--fn", default=None, metavar="MODULE:FUNCTION",
              help="A Python reward function fn(episode) -> float | None (module or path/to/file.py).")
@click.option("--sql", default=None, help="SQL over the store's views returning (episode_id, reward) rows.")
@click.option("--judge-url", default=None, metavar="URL", help="An OpenAI-compatible endpoint for an LLM judge.")
@click.option("--judge-model", default="judge", show_default=True, help="Model name for the judge.")
@click.option("--rubric", default="Did the agent solve the task correctly and concisely?", show_default=True,
              help="What the judge grades.")
@click.option("--judge-api-key", default=None, envvar="TRACETRAIN_JUDGE_API_KEY",
              help="Bearer key for the judge endpoint. [env TRACETRAIN_JUDGE_API_KEY]")
@click.option("--judge-max-score", type=float, default=10.0, show_default=True,
              help="The judge scores 0..N; the reward is score / N.")
@click.option("--verify-key", default=None, metavar="ATTRIBUTE",
              help="Final-answer verifier: the span attribute holding the expected answer (1.0 right, 0.0 wrong).")
@click.option("--tool-error-penalty", "penalty", type=float, default=None, metavar="AMOUNT",
              help="Subtract AMOUNT per failed tool span.")
@click.option("--where", default=None, help="SQL condition on the episodes view choosing which episodes to score.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Episodes scored at once (helps an LLM judge).")
@click.option("--post", "post_url", default=None, metavar="URL",
              help="Also store the rewards through this collector's /v1/rewards (its OTLP/HTTP endpoint).")
@click.option("--name", default="computed", show_default=True, help="tracetrain.reward.name of posted rewards.")
@click.option("--token", default=None, envvar="TRACETRAIN_COLLECTOR_AUTH_TOKEN",
              help="Bearer token for --post. [env TRACETRAIN_COLLECTOR_AUTH_TOKEN]")
def score_command(data_dir, fn, sql, judge_url, judge_model, rubric, judge_api_key, judge_max_score, verify_key,
                  penalty, where, workers, post_url, name, token) -> None:
    """Compute rewards from the spans of stored episodes (verifier, tool-error penalty, LLM judge, any function or SQL).

    Prints one JSON line per scored episode; a summary goes to stderr. With --post the
    rewards are stored as delayed rewards, so `episodes.reward` shows them. Exits 1
    when some episode could not be scored or stored (the others are still printed).

    \b
    Examples:
      tracetrain score --data ./tracetrain-data --verify-key task.expected --tool-error-penalty 0.1
      tracetrain score --data ./tracetrain-data --fn my_rewards.py:reward --post http://127.0.0.1:4318
      tracetrain score --data ./tracetrain-data --sql "SELECT episode_id, -n_llm_calls FROM episodes"
    """
    reward_fn = _reward_function(fn, sql, judge_url, judge_model, rubric, judge_api_key, judge_max_score,
                                 verify_key, penalty)
    try:
        con = connect(data_dir)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        try:
            ids = episode_ids_in_store(con, where)
        except Exception as exc:  # duckdb errors for a bad --where
            raise click.UsageError(f"--where: {exc}") from None
        try:
            # click hides the bar when stderr is not a terminal
            with click.progressbar(length=len(ids), label="scoring", file=sys.stderr) as bar:
                report = rw.score_episodes(con, reward_fn, ids, on_error="skip", workers=workers,
                                           chunk_episodes=100, on_progress=bar.update)
        except rw.RewardError as exc:
            raise click.ClickException(str(exc)) from None
    finally:
        con.close()
    for episode_id, value in report.rewards.items():
        click.echo(json.dumps({"episode_id": episode_id, "reward": value}))
    for episode_id, error in report.errors.items():
        click.echo(f"error: {error}" if episode_id in error else f"error: episode {episode_id}: {error}", err=True)
    click.echo(f"scored {len(report.rewards)} of {len(ids)} episodes; {len(report.no_reward)} without a reward, "
               f"{len(report.errors)} failed", err=True)
    failed = bool(report.errors)
    if post_url and report.rewards:
        posted = post_rewards(post_url, report.rewards, name=name, token=token)
        for episode_id, error in posted.failed.items():
            click.echo(f"not stored: episode {episode_id}: {error}", err=True)
        click.echo(f"stored {posted.stored}, already stored {posted.duplicate}, failed {len(posted.failed)}",
                   err=True)
        failed = failed or bool(posted.failed)
    if failed:
        sys.exit(1)
