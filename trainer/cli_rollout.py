"""`tracetrain rollout` (entry point in the ``tracetrain.cli`` group): a thin skin over ``rollout.run_rollouts``."""

from __future__ import annotations

import json
import sys

import click


@click.command("rollout")
@click.option("--tasks", "tasks_path", required=True, type=click.Path(dir_okay=False),
              help="JSON-lines file, one task object per line with an \"id\"; the whole object goes to the agent.")
@click.option("--agent", default=None, metavar="CMD|MODULE:FUNCTION",
              help="A command run once per episode (task in $TRACETRAIN_TASK, on stdin, and in {task} / {prompt} "
                   "placeholders; last stdout line = answer), or a Python function module:function "
                   "(or path/file.py:function) called in-process, f(task) -> answer.")
@click.option("--agent-server", default=None, metavar="CMD",
              help="A long-lived agent process fed JSON-lines tasks on stdin (docs/rollout.md protocol).")
@click.option("--server-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Copies of --agent-server to run.")
@click.option("--group-size", "-G", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per task (rollout ids 0..G-1).")
@click.option("--concurrency", "-C", type=click.IntRange(min=1), default=8, show_default=True,
              help="Episodes in flight at once.")
@click.option("--grader", default=None, metavar="CMD|MODULE:FUNCTION",
              help="Reward for episodes whose agent gives none: f(task, answer) -> float, or a command "
                   "(task in $TRACETRAIN_TASK, answer in $TRACETRAIN_ANSWER; prints a number).")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Per-episode limit; a run past it is killed (commands) and recorded as timed out.")
@click.option("--failure-reward", type=float, default=None,
              help="Reward recorded for failed and timed-out episodes [default: none, they are only marked as "
                   "errors and the trainer leaves them out].")
@click.option("--collector", metavar="URL", default=None,
              help="OTLP endpoint for the episodes' spans [default: $OTEL_EXPORTER_OTLP_ENDPOINT, else "
                   "http://127.0.0.1:4317].")
@click.option("--protocol", type=click.Choice(["grpc", "http/protobuf"]), default="grpc", show_default=True)
@click.option("--run-id", default=None, help="Prefix of the episode ids <run-id>-<task-id>-<k> [default: random].")
@click.option("--agent-name", default=None, help="gen_ai.agent.name of the episodes.")
@click.option("--service-name", default=None, help="OTEL_SERVICE_NAME of the agent (and the runner's spans).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write one JSON line per episode here (ids, status, answer, reward, error, duration).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Run this many rounds of --tasks-per-round fresh tasks (online RL) instead of every task once.")
@click.option("--tasks-per-round", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --rounds: tasks drawn per round (seeded shuffle, each task used once per pass).")
@click.option("--await-policy", "policy_url", metavar="URL", default=None,
              help="With --rounds: after each round wait until this `tracetrain serve` endpoint answers with a "
                   "newer policy version (on-policy rounds).")
@click.option("--policy-timeout-s", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="With --await-policy: give up after this long without a new version.")
@click.option("--on-policy-timeout", type=click.Choice(["fail", "continue"]), default="fail", show_default=True,
              help="With --await-policy: when no new version comes (the trainer had nothing to learn from the "
                   "round), fail, or sample the next round with the same policy.")
@click.option("--policy-lag", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --await-policy: rounds the trainer may still have to take when the next round starts "
                   "(1: sample the next round while it trains on this one, one version behind).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --rounds: seed of the task order.")
def rollout_command(tasks_path, agent, agent_server, server_processes, group_size, concurrency, grader, timeout_s,
                    failure_reward, collector, protocol, run_id, agent_name, service_name, out_path, quiet,
                    rounds, tasks_per_round, policy_url, policy_timeout_s, on_policy_timeout, policy_lag, seed):
    """Run an unchanged agent on every task G times, each run captured as an episode, and grade it.

    \b
    tracetrain rollout --tasks tasks.jsonl --agent "python agent.py {prompt}" --grader grade.py:score -G 4 -C 16
    tracetrain rollout --tasks tasks.jsonl --agent my_agent:solve --group-size 8 --concurrency 64
    tracetrain rollout --tasks tasks.jsonl --agent-server "node agent.js --serve" --server-processes 2
    tracetrain rollout --tasks train.jsonl --agent my_agent:solve -G 8 -C 32 \\
        --rounds 100 --tasks-per-round 16 --await-policy http://127.0.0.1:8000
    A crashed, failing or hung run is recorded as a failed episode and the others go on.
    Prints a JSON summary: episodes ok / failed / timed out, mean reward, episodes/s
    (with --rounds, one line per round).
    """
    from .rollout import RolloutError, load_tasks, run_rollouts
    from .rollout_server import ServerAgent

    if (agent is None) == (agent_server is None):
        raise click.UsageError("give exactly one of --agent and --agent-server")
    try:
        tasks = load_tasks(tasks_path)
        target = ServerAgent(agent_server, server_processes, service_name) if agent_server else agent
    except (RolloutError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    if rounds is not None:
        _run_rounds_command(tasks, target, rounds, tasks_per_round, group_size, policy_url, policy_timeout_s,
                            on_policy_timeout == "continue", seed, policy_lag,
                            dict(concurrency=concurrency, collector=collector, protocol=protocol, grader=grader,
                                 timeout_s=timeout_s, failure_reward=failure_reward, agent_name=agent_name,
                                 service_name=service_name), run_id, out_path)
        return
    out = open(out_path, "w") if out_path else None  # noqa: SIM115 - closed below
    total = len(tasks) * group_size
    bar = click.progressbar(length=total, label="episodes", file=sys.stderr) if not quiet else None

    def on_result(result) -> None:
        if out:
            out.write(json.dumps(result.to_json(), default=str) + "\n")
        if bar:
            bar.update(1)

    try:
        if bar:
            bar.__enter__()
        summary = run_rollouts(tasks, target, group_size=group_size, concurrency=concurrency, collector=collector,
                               protocol=protocol, grader=grader, timeout_s=timeout_s, failure_reward=failure_reward,
                               run_id=run_id, agent_name=agent_name, service_name=service_name, on_result=on_result)
    except RolloutError as error:
        raise click.UsageError(str(error)) from None
    finally:
        if bar:
            bar.__exit__(None, None, None)
        if out:
            out.close()
    click.echo(json.dumps(summary.to_json()))
    if summary.n_ok == 0:
        sys.exit(1)


def _run_rounds_command(tasks, target, rounds, tasks_per_round, group_size, policy_url, policy_timeout_s,
                        continue_on_timeout, seed, policy_lag, options, run_id, out_path) -> None:
    """``--rounds``: one JSON summary line per round, results appended to ``--out``."""
    import uuid

    from .rollout import RolloutError
    from .rollout_rounds import PolicyWaitTimeout, run_rounds

    out = open(out_path, "w") if out_path else None  # noqa: SIM115 - closed below

    def on_round(index, summary, version) -> None:
        if out:
            for result in summary.results:
                out.write(json.dumps({"round": index, **result.to_json()}, default=str) + "\n")
            out.flush()
        click.echo(json.dumps({"round": index, "policy_version": version, **summary.to_json()}))

    try:
        run_rounds(tasks, target, rounds=rounds, tasks_per_round=tasks_per_round, group_size=group_size,
                   run_id=run_id or uuid.uuid4().hex[:8], policy_url=policy_url, policy_timeout_s=policy_timeout_s,
                   continue_on_policy_timeout=continue_on_timeout, seed=seed, policy_lag=policy_lag,
                   on_round=on_round, **options)
    except RolloutError as error:
        raise click.UsageError(str(error)) from None
    except PolicyWaitTimeout as error:
        raise click.ClickException(str(error)) from None
    finally:
        if out:
            out.close()
