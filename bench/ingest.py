#!/usr/bin/env python3
"""Ingest benchmark: the tracetrain collector under the shared OTLP ingest harness.

Runs, in order, all on 127.0.0.1 (see bench/README.md for what each figure means):

  steady    our collector, 1 sender x 8 in flight, 512 spans/request
  ref       the reference receiver (--sink parquet --attrs proto, the 41 us one of
            shared/notes/peer-ingest.md), same load, back-to-back, for the ratio
  overload  our collector, 2 senders x 16 in flight
  kill9     our collector, SIGKILL mid-run, restarted on the same store and ports
  lag       one-span exports with the OTel SDK gRPC exporter, polled from another
            process until queryable

The harness (ingest_bench.py) and the reference receiver (ref_receiver.py) are
run from the shared folder as subprocesses, never copied: by default
``<repo>/../shared/bench``, or the folder in $TRACETRAIN_SHARED_BENCH.

Writes bench/results/ingest-<UTC date>[-quick].json and bench/results/ingest-latest.json;
logs, stores and raw harness output go to bench/work/ingest/ (git-ignored, wiped
at the start of each run).

    .venv/bin/python bench/ingest.py            # full, ~3-4 minutes
    .venv/bin/python bench/ingest.py --quick    # ~1.5 minutes, shorter runs
    .venv/bin/python bench/ingest.py --runs steady,ref --duration-s 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_support import (  # noqa: E402 - bench/ is on sys.path when run as a script
    REPO,
    RESULTS_DIR,
    WORK_DIR,
    PROBE,
    ALL_RUNS,
    PACKAGES,
    HIST_KEYS,
    TARGET_US_PER_SPAN,
    TARGET_P99_MS,
    TARGET_OVERLOAD_RSS_MB,
    _STRIP_ENV_PREFIXES,
    log,
    shared_bench_dir,
    free_port,
    http_get,
    percentile,
    r1,
    Children,
    _alive,
    wait_http,
    HealthWatch,
    scrape_metrics,
    hist_delta,
    scan_log,
    probe_count,
)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    data: Path
    logfile: Path
    cmd: list[str]
    ready_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


class Bench:
    def __init__(self, args: argparse.Namespace, shared: Path) -> None:
        self.args, self.shared = args, shared
        self.children = Children()
        self.python = sys.executable
        exe = Path(sys.executable).parent / "tracetrain"
        self.tracetrain = str(exe) if exe.exists() else (shutil.which("tracetrain") or "tracetrain")
        self.results: dict[str, Any] = {}

    # ---- servers

    def collector_cmd(self, data: Path, grpc_port: int, http_port: int) -> list[str]:
        return [self.tracetrain, "collector", "--data", str(data), "--grpc-endpoint", f"127.0.0.1:{grpc_port}",
                "--http-endpoint", f"127.0.0.1:{http_port}", "--writer-id", "w0", *self.args.collector_arg]

    def start_collector(self, name: str) -> Server:
        run_dir = WORK_DIR / name
        run_dir.mkdir(parents=True, exist_ok=True)
        data, logfile = run_dir / "data", run_dir / "collector.log"
        gp, hp = free_port(), free_port()
        cmd = self.collector_cmd(data, gp, hp)
        # cwd = the run folder, so no tracetrain.toml of the caller's is picked up
        proc = self.children.spawn(f"collector[{name}]", cmd, logfile, cwd=run_dir)
        srv = Server(name, proc, gp, hp, data, logfile, cmd)
        srv.ready_s = wait_http(srv.base_url + "/healthz", 60, proc, logfile)
        log(f"{name}: collector pid {proc.pid} ready in {srv.ready_s:.2f}s (grpc {gp}, http {hp})")
        return srv

    def start_ref(self, name: str) -> Server:
        run_dir = WORK_DIR / name
        run_dir.mkdir(parents=True, exist_ok=True)
        data, logfile = run_dir / "data", run_dir / "ref_receiver.log"
        gp, hp = free_port(), free_port()
        cmd = [self.python, str(self.shared / "ref_receiver.py"), "--sink", "parquet", "--attrs", "proto",
               "--db", str(data), "--grpc", f"127.0.0.1:{gp}", "--http", f"127.0.0.1:{hp}"]
        proc = self.children.spawn(f"ref_receiver[{name}]", cmd, logfile, cwd=run_dir)
        srv = Server(name, proc, gp, hp, data, logfile, cmd)
        srv.ready_s = wait_http(srv.base_url + "/count", 60, proc, logfile)
        log(f"{name}: ref_receiver pid {proc.pid} ready in {srv.ready_s:.2f}s (grpc {gp}, http {hp})")
        return srv

    def stop_server(self, srv: Server) -> dict[str, Any]:
        code, took = self.children.stop(srv.proc)
        return {"exit_code": code, "stop_s": round(took, 2)}

    # ---- harness

    def harness(self, label: str, srv_endpoint: str, server_pid: int, verify_cmd: str, extra: list[str],
                run_dir: Path) -> dict[str, Any]:
        a = self.args
        jsonl = run_dir / "harness.jsonl"
        cmd = [self.python, str(self.shared / "ingest_bench.py"), "--endpoint", srv_endpoint,
               "--spans-per-request", str(a.spans_per_request), "--server-pid", str(server_pid),
               "--verify-cmd", verify_cmd, "--verify-stable-s", str(a.verify_stable_s),
               "--verify-timeout-s", str(a.verify_timeout_s), "--templates", str(a.templates),
               "--label", label, "--json-out", str(jsonl), *extra]
        (run_dir / "harness.cmd").write_text(shlex.join(cmd) + "\n")
        logfile = run_dir / "harness.log"
        log(f"{label}: harness {' '.join(extra)}")
        # every wait inside the harness is bounded; this bound covers them all
        duration = float(_opt(extra, "--duration-s", 20))
        drain = float(_opt(extra, "--drain-s", 30))
        export_to = float(_opt(extra, "--export-timeout-s", 60))
        bound = duration + drain + export_to + a.verify_timeout_s + 240
        p = self.children.spawn(f"harness[{label}]", cmd, logfile, cwd=run_dir)
        try:
            p.wait(bound)
        except subprocess.TimeoutExpired:
            self.children.stop(p, grace_s=5)
            raise RuntimeError(f"{label}: harness did not finish within {bound:.0f}s; see {logfile}")
        text = logfile.read_text(errors="replace")
        if p.returncode != 0 or not jsonl.exists():
            raise RuntimeError(f"{label}: harness exited with {p.returncode}:\n{text[-3000:]}")
        for line in text.splitlines():
            if line.startswith(("== ", "   ")):
                print("   " + line.strip(), flush=True)
        return json.loads(jsonl.read_text().strip().splitlines()[-1])

    def verify_cmd_ours(self, data: Path) -> str:
        log_file = data.parent / "verify_errors.log"
        return shlex.join([self.python, str(PROBE), "count", str(data), "--log", str(log_file)])

    def verify_cmd_ref(self, data: Path) -> str:
        # counted by a separate process, as for ours: the receiver's own /count would
        # run the DuckDB count inside the server and add to its measured CPU
        return shlex.join([self.python, str(self.shared / "ref_receiver.py"), "--count", str(data)])

    def load_args(self, procs: int, inflight: int, duration: float) -> list[str]:
        return ["--procs", str(procs), "--inflight", str(inflight), "--duration-s", str(duration)]

    # ---- runs

    def run_ours(self, name: str, procs: int, inflight: int) -> dict[str, Any]:
        srv = self.start_collector(name)
        out: dict[str, Any] = {"server": "tracetrain", "server_cmd": shlex.join(srv.cmd),
                               "ready_s": round(srv.ready_s, 2)}
        try:
            out["harness"] = self.harness(f"tracetrain-{name}", srv.endpoint, srv.proc.pid,
                                          self.verify_cmd_ours(srv.data),
                                          self.load_args(procs, inflight, self.args.duration_s), WORK_DIR / name)
            out["metrics"] = scrape_metrics(srv.base_url + "/metrics")
        finally:
            out["stop"] = self.stop_server(srv)
        out["store_after_stop"] = probe_count(srv.data)
        out["log"] = scan_log(srv.logfile)
        out["reader_errors"] = reader_errors(srv.data.parent)
        return out

    def run_ref(self, name: str) -> dict[str, Any]:
        srv = self.start_ref(name)
        out: dict[str, Any] = {"server": "ref_receiver --sink parquet --attrs proto", "server_cmd": shlex.join(srv.cmd),
                               "ready_s": round(srv.ready_s, 2)}
        try:
            out["harness"] = self.harness(f"ref-parquet-proto-{name}", srv.endpoint, srv.proc.pid,
                                          self.verify_cmd_ref(srv.data),
                                          self.load_args(1, 8, self.args.duration_s), WORK_DIR / name)
            try:
                out["stats"] = json.loads(http_get(srv.base_url + "/stats", 60))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                out["stats"] = {"error": str(exc)}
        finally:
            out["stop"] = self.stop_server(srv)
        return out

    def run_kill9(self, name: str = "kill9") -> dict[str, Any]:
        a = self.args
        srv = self.start_collector(name)
        run_dir = WORK_DIR / name
        pidfile = run_dir / "restarted.pid"
        restart = run_dir / "restart.sh"
        restart.write_text(
            "#!/bin/bash\n# started by the harness after its kill -9: same store, same ports\n"
            f"cd {shlex.quote(str(run_dir))}\n"
            f"echo $$ > {shlex.quote(str(pidfile))}\n"
            f"echo \"=== restart $(date -u +%FT%T.%NZ) ===\" >> {shlex.quote(str(srv.logfile))}\n"
            f"exec {shlex.join(srv.cmd)} >> {shlex.quote(str(srv.logfile))} 2>&1\n")
        self.children.watch_pidfile(pidfile)
        out: dict[str, Any] = {"server": "tracetrain", "server_cmd": shlex.join(srv.cmd),
                               "ready_s": round(srv.ready_s, 2)}
        # reap the first collector as soon as the harness kills it (a zombie still has
        # a /proc entry, and the harness's sampler would take it for alive)
        threading.Thread(target=srv.proc.wait, daemon=True).start()
        watch = HealthWatch(srv.base_url + "/healthz")
        watch.start()
        restarted_pid = None
        try:
            extra = [*self.load_args(1, 8, a.kill_duration_s), "--kill-at-s", str(a.kill_at_s),
                     "--restart-cmd", f"bash {shlex.quote(str(restart))}",
                     "--restart-log", str(run_dir / "restart.log"),
                     "--export-timeout-s", "120", "--drain-s", "120"]
            # the harness's verify runs only after the senders finish, so the restart is done by then
            out["harness"] = self.harness(f"tracetrain-{name}", srv.endpoint, srv.proc.pid,
                                          self.verify_cmd_ours(srv.data), extra, run_dir)
            watch.stop_evt.set()
            watch.join(2)
            out["outage"] = watch.result()
            if pidfile.exists():
                restarted_pid = int(pidfile.read_text().split()[0])
            out["restarted_pid"] = restarted_pid
            out["metrics_after_restart"] = scrape_metrics(srv.base_url + "/metrics")
        finally:
            watch.stop_evt.set()
            srv.proc.poll()  # reap the killed one
            out["first_exit_code"] = srv.proc.returncode
            if restarted_pid and _alive(restarted_pid):
                _, took = self.children.stop_pid(restarted_pid)
                out["stop"] = {"stop_s": round(took, 2)}
        out["store_after_stop"] = probe_count(srv.data)
        out["log"] = scan_log(srv.logfile)
        out["reader_errors"] = reader_errors(run_dir)
        return out

    def run_lag(self, name: str = "lag") -> dict[str, Any]:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SpanExportResult

        a = self.args
        srv = self.start_collector(name)
        run_dir = WORK_DIR / name
        out: dict[str, Any] = {"server": "tracetrain", "server_cmd": shlex.join(srv.cmd), "samples": a.lag_samples,
                               "sender": "opentelemetry-sdk OTLPSpanExporter (gRPC), one span per export",
                               "poller": "bench/store_probe.py watch (separate process, DuckDB over the files)"}
        watcher = None
        exporter = None
        try:
            with open(run_dir / "watch.stderr", "ab") as err:
                watcher = self.children.spawn(
                    "store_probe watch", [self.python, str(PROBE), "watch", str(srv.data)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
            line = _readline(watcher, 60)
            if line != "READY":
                raise RuntimeError(f"lag poller did not start: {line!r}")
            # no span processor: spans are exported by hand, so the send time is exact
            provider = TracerProvider(resource=Resource.create({"service.name": "lag-probe"}))
            tracer = provider.get_tracer("tracetrain.bench.lag")
            exporter = OTLPSpanExporter(endpoint=srv.endpoint, insecure=True, timeout=10)

            def one_span(i: int):
                span = tracer.start_span("chat lag-probe", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": "lag-probe",
                    "tracetrain.episode.id": i})
                span.end()
                return span

            warm = one_span(-1)  # connects the channel, creates the partition; not measured
            if exporter.export([warm]) != SpanExportResult.SUCCESS:
                raise RuntimeError("lag: warm-up export failed")
            metrics_before = scrape_metrics(srv.base_url + "/metrics")
            send_ms, ack_ms, send_end_ms, ack_end_ms, rtt_ms, polls, poll_ms = [], [], [], [], [], [], []
            timeouts = 0
            for i in range(a.lag_samples):
                span = one_span(i)
                ctx = span.get_span_context()
                watcher.stdin.write(f"WATCH {ctx.trace_id:032x} {ctx.span_id:016x} 30\n")
                watcher.stdin.flush()
                if _readline(watcher, 10) != "ARMED":
                    raise RuntimeError("lag poller did not arm")
                t_send = time.time_ns()
                ok = exporter.export([span])
                t_ack = time.time_ns()
                reply = _readline(watcher, 40).split()
                if ok != SpanExportResult.SUCCESS:
                    raise RuntimeError(f"lag: export {i} failed")
                rtt_ms.append((t_ack - t_send) / 1e6)
                if reply[0] == "SEEN":
                    t_vis, t_got = int(reply[1]), int(reply[2])
                    send_ms.append((t_vis - t_send) / 1e6)
                    ack_ms.append((t_vis - t_ack) / 1e6)
                    send_end_ms.append((t_got - t_send) / 1e6)
                    ack_end_ms.append((t_got - t_ack) / 1e6)
                    polls.append(int(reply[3]))
                    poll_ms.append(float(reply[4]))
                else:
                    timeouts += 1
                time.sleep(a.lag_gap_s)
            watcher.stdin.write("QUIT\n")
            watcher.stdin.flush()
            series = {"send_to_visible_ms": send_ms, "ack_to_visible_ms": ack_ms,
                      "send_to_read_ms": send_end_ms, "ack_to_read_ms": ack_end_ms,
                      "export_rtt_ms": rtt_ms, "poll_query_ms": poll_ms}
            for key, xs in series.items():
                out[key] = [round(x, 2) for x in xs]
                out[key + "_median"] = r1(statistics.median(xs), 2) if xs else None
                out[key + "_p95"] = r1(percentile(xs, 0.95), 2)
            out.update({"polls": polls, "timeouts": timeouts})
            out["metrics"] = scrape_metrics(srv.base_url + "/metrics")
            out["lag_histogram_samples_only"] = hist_delta(
                metrics_before.get("tracetrain_lag_to_queryable_seconds"),
                out["metrics"].get("tracetrain_lag_to_queryable_seconds"))
        finally:
            if exporter is not None:
                exporter.shutdown()
            if watcher is not None:
                try:
                    watcher.wait(5)
                except subprocess.TimeoutExpired:
                    self.children.stop(watcher, grace_s=2)
            out["stop"] = self.stop_server(srv)
        out["log"] = scan_log(srv.logfile)
        out["reader_errors"] = reader_errors(run_dir)
        return out


def reader_errors(run_dir: Path) -> dict[str, Any]:
    """Failed reads of the store by the verify counts and the lag poller (each was retried)."""
    lines = []
    for name in ("verify_errors.log", "watch.stderr"):
        path = run_dir / name
        if path.exists():
            lines += [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return {"count": len(lines), "first": lines[:5]}


def _opt(argv: list[str], flag: str, default: Any) -> Any:
    return argv[argv.index(flag) + 1] if flag in argv else default


def _readline(p: subprocess.Popen, timeout_s: float) -> str:
    """One line from p.stdout, or RuntimeError after timeout_s (the pipe is read in a thread)."""
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        raise RuntimeError(f"no answer from pid {p.pid} within {timeout_s}s")
    if not box[0]:
        raise RuntimeError(f"pid {p.pid} closed its output (exit code {p.poll()})")
    return box[0].strip()


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    git = {}
    try:
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        git["dirty_files"] = len(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                                text=True, timeout=10).stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    # the working tree may hold others' uncommitted edits: fingerprint the code under test
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "collector").glob("*.py"), *(REPO / "instrumentation").glob("*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    git["collector_instrumentation_sha256"] = digest.hexdigest()[:16]
    return {"nproc": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
            "mem_gib": mem_gib, "kernel": platform.release(), "python": platform.python_version(),
            "packages": versions, "git": git}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}

    def h(run: str) -> dict[str, Any]:
        return (results.get(run) or {}).get("harness") or {}

    def dup(run: str) -> int | None:
        st = (results.get(run) or {}).get("store_after_stop") or {}
        return st.get("duplicates")

    def counts(run: str) -> dict[str, Any]:
        r = h(run)
        acked = r.get("spans_acked")
        stored = r.get("stored_delta")
        return {"acked": acked, "stored_distinct": stored,
                "lost": r.get("acked_but_not_stored"),
                "stored_minus_acked": None if acked is None or stored is None else stored - acked,
                "duplicates": dup(run), "failed": r.get("spans_failed")}

    if h("steady"):
        r = h("steady")
        s["ours_us_per_stored_span"] = r.get("server_cpu_us_per_stored_span")
        s["ours_us_per_span_during_load"] = r.get("server_cpu_us_per_acked_span")
        s["ours_cpu_s_after_load"] = _after_load_cpu(r)
        s["ours_stored_spans_per_s"] = r.get("stored_spans_per_s")
        s["ours_acked_spans_per_s"] = r.get("spans_per_s_acked")
        s["ours_export_ms_p50"], s["ours_export_ms_p99"] = r.get("export_ms_p50"), r.get("export_ms_p99")
        s["ours_rpc_ms_p50"], s["ours_rpc_ms_p99"] = r.get("rpc_ms_p50"), r.get("rpc_ms_p99")
        s["ours_rss_peak_mb"] = r.get("server_rss_peak_mb")
        s["ours_rss_peak_mb_during_load"] = _rss_during_load(r)
        s["ours_server_cpu_pct_of_machine"] = r.get("server_cpu_pct_of_machine")
        s["steady"] = counts("steady")
        m = results["steady"].get("metrics") or {}
        s["steady"]["compactions"] = m.get("tracetrain_compactions_total")
        s["steady"]["reader_errors"] = (results["steady"].get("reader_errors") or {}).get("count")
        s["steady"]["files_written"] = m.get("tracetrain_files_written_total")
    if h("ref"):
        r = h("ref")
        s["ref_us_per_stored_span"] = r.get("server_cpu_us_per_stored_span")
        s["ref_us_per_span_during_load"] = r.get("server_cpu_us_per_acked_span")
        s["ref_cpu_s_after_load"] = _after_load_cpu(r)
        s["ref_stored_spans_per_s"] = r.get("stored_spans_per_s")
        s["ref_export_ms_p50"], s["ref_export_ms_p99"] = r.get("export_ms_p50"), r.get("export_ms_p99")
        s["ref_rss_peak_mb"] = r.get("server_rss_peak_mb")
        s["ref"] = counts("ref")
        st = results["ref"].get("stats") or {}
        if "rows" in st and "distinct_spans" in st:
            s["ref"]["duplicates"] = st["rows"] - st["distinct_spans"]
    if s.get("ours_us_per_stored_span") and s.get("ref_us_per_stored_span"):
        s["ratio_us_per_span_ours_over_ref"] = round(s["ours_us_per_stored_span"] / s["ref_us_per_stored_span"], 3)
    if s.get("ours_us_per_span_during_load") and s.get("ref_us_per_span_during_load"):
        s["ratio_us_per_span_during_load_ours_over_ref"] = round(
            s["ours_us_per_span_during_load"] / s["ref_us_per_span_during_load"], 3)
    if s.get("ours_stored_spans_per_s") and s.get("ref_stored_spans_per_s"):
        s["ratio_spans_per_s_ours_over_ref"] = round(s["ours_stored_spans_per_s"] / s["ref_stored_spans_per_s"], 3)
    if h("overload"):
        r = h("overload")
        m = results["overload"].get("metrics") or {}
        s["overload"] = {**counts("overload"), "rss_peak_mb": r.get("server_rss_peak_mb"),
                         "rss_peak_mb_during_load": _rss_during_load(r),
                         "compactions": m.get("tracetrain_compactions_total"),
                         "stored_spans_per_s": r.get("stored_spans_per_s"),
                         "us_per_stored_span": r.get("server_cpu_us_per_stored_span"),
                         "export_ms_p50": r.get("export_ms_p50"), "export_ms_p99": r.get("export_ms_p99"),
                         "rpc_ms_p99": r.get("rpc_ms_p99"),
                         "refusals_seen_by_senders": r.get("errors", {}),
                         "retries": r.get("retries"),
                         "collector_spans_refused": m.get("tracetrain_spans_refused_total"),
                         "collector_requests_refused":
                             m.get("tracetrain_requests_total{outcome=refused,transport=grpc}")}
    if h("kill9"):
        r = h("kill9")
        k = results["kill9"]
        m = k.get("metrics_after_restart") or {}
        s["kill9"] = {**counts("kill9"), "acked_at_kill": r.get("acked_at_kill"), "killed_at_s": r.get("killed_at_s"),
                      "restarted_at_s": r.get("restarted_at_s"),
                      "healthz_outage_s": (k.get("outage") or {}).get("healthz_outage_s"),
                      "export_ms_p99": r.get("export_ms_p99"), "export_ms_max": r.get("export_ms_max"),
                      "errors_seen_by_senders": r.get("errors", {}),
                      "collector_duplicates_dropped_after_restart": m.get("tracetrain_spans_duplicate_total"),
                      "compactions_after_restart": m.get("tracetrain_compactions_total")}
    if results.get("lag") and results["lag"].get("samples"):
        lg = results["lag"]
        hist = lg.get("lag_histogram_samples_only") or {}
        s["lag"] = {k: lg.get(k) for k in (
            "send_to_visible_ms_median", "send_to_visible_ms_p95", "ack_to_visible_ms_median", "ack_to_visible_ms_p95",
            "send_to_read_ms_median", "ack_to_read_ms_median", "export_rtt_ms_median", "poll_query_ms_median",
            "timeouts")}
        s["lag"]["n"] = len(lg.get("send_to_visible_ms") or [])
        s["lag"]["collector_histogram"] = {k: hist.get(k) for k in HIST_KEYS}
    steady_hist = ((results.get("steady") or {}).get("metrics") or {}).get("tracetrain_lag_to_queryable_seconds")
    if steady_hist:
        s["steady_lag_histogram"] = {k: steady_hist.get(k) for k in HIST_KEYS}

    t: dict[str, Any] = {}
    if "ours_us_per_stored_span" in s:
        t["us_per_stored_span<=50"] = _check(s["ours_us_per_stored_span"], lambda v: v <= TARGET_US_PER_SPAN)
        t["export_p99_ms<500@8inflight"] = _check(s["ours_export_ms_p99"], lambda v: v < TARGET_P99_MS)
        t["steady_acked==stored"] = _check(s["steady"], _equal_counts)
    if "overload" in s:
        t["overload_rss_mb<500"] = _check(s["overload"]["rss_peak_mb"], lambda v: v < TARGET_OVERLOAD_RSS_MB)
        t["overload_acked==stored"] = _check(s["overload"], _equal_counts)
    if "kill9" in s:
        t["kill9_lost==0"] = _check(s["kill9"]["lost"], lambda v: v == 0)
        t["kill9_acked==stored"] = _check(s["kill9"], _equal_counts)
        t["kill9_no_duplicates"] = _check(s["kill9"]["duplicates"], lambda v: v == 0)
    s["targets"] = t
    return s


def _after_load_cpu(r: dict[str, Any]) -> float | None:
    """Server CPU seconds between the last ack and the settled count (compaction, if it ran)."""
    if r.get("server_cpu_s_incl_drain") is None or r.get("server_cpu_s") is None:
        return None
    return round(r["server_cpu_s_incl_drain"] - r["server_cpu_s"], 2)


def _rss_during_load(r: dict[str, Any]) -> float | None:
    """Peak of the harness's 1-s RSS series up to the end of the load (the 0.25-s peak covers the settle too)."""
    pts = [mb for t, mb in r.get("server_rss_series_mb") or [] if t <= (r.get("wall_s") or 0)]
    return max(pts) if pts else None


def _equal_counts(c: dict[str, Any]) -> bool:
    return c.get("acked") is not None and c.get("acked") == c.get("stored_distinct")


def _check(value: Any, pred) -> dict[str, Any]:
    try:
        ok = bool(pred(value)) if value is not None else None
    except TypeError:
        ok = None
    shown = {k: value[k] for k in ("acked", "stored_distinct")} if isinstance(value, dict) else value
    return {"value": shown, "pass": ok}


def print_table(report: dict[str, Any]) -> None:
    s = report["summary"]

    def f(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    rows = [("run", "spans/s stored", "us/span", "us/span load", "p50/p99 export ms", "rss MB peak", "rss MB load",
             "acked", "stored", "lost", "dups")]
    for run, label in (("steady", "tracetrain 1x8"), ("ref", "ref parquet/proto 1x8"), ("overload", "tracetrain 2x16"),
                       ("kill9", "tracetrain kill -9")):
        r = (report["runs"].get(run) or {}).get("harness")
        if not r:
            continue
        c = s.get(run) or {}
        # kill9: the harness samples only the first (killed) process, so no CPU figure
        us = None if run == "kill9" else r.get("server_cpu_us_per_stored_span")
        us_load = None if run == "kill9" else r.get("server_cpu_us_per_acked_span")
        rows.append((label, f(r.get("stored_spans_per_s")), f(us), f(us_load),
                     f"{f(r.get('export_ms_p50'))} / {f(r.get('export_ms_p99'))}", f(r.get("server_rss_peak_mb")),
                     f(None if run == "kill9" else _rss_during_load(r)),
                     f(r.get("spans_acked")), f(r.get("stored_delta")), f(r.get("acked_but_not_stored")),
                     f(c.get("duplicates"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    print(f"tracetrain ingest bench ({report['mode']}), {report['started_utc']}, "
          f"{report['machine']['nproc']} cpus, load {report['load_before']} -> {report['load_after']}")
    for i, row in enumerate(rows):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if "ratio_us_per_span_ours_over_ref" in s:
        print(f"  ours/ref: {s['ratio_us_per_span_ours_over_ref']}x CPU per stored span "
              f"({s.get('ratio_us_per_span_during_load_ours_over_ref')}x during the load alone), "
              f"{s.get('ratio_spans_per_s_ours_over_ref')}x stored spans/s")
        print(f"  CPU after the last ack (compaction etc.): ours {f(s.get('ours_cpu_s_after_load'))} s "
              f"({f(s['steady'].get('compactions'))} files compacted), ref {f(s.get('ref_cpu_s_after_load'))} s")
    if "overload" in s:
        o = s["overload"]
        print(f"  overload: refusals seen by senders {o['refusals_seen_by_senders']}, collector refused requests "
              f"{f(o['collector_requests_refused'])} (tracetrain_spans_refused_total {f(o['collector_spans_refused'])})")
    if "kill9" in s:
        k = s["kill9"]
        print(f"  kill -9: acked at kill {f(k['acked_at_kill'])}, healthz outage {f(k.get('healthz_outage_s'))} s, "
              f"duplicates dropped after restart {f(k['collector_duplicates_dropped_after_restart'])}")
    if "lag" in s:
        lg = s["lag"]
        hist = lg["collector_histogram"]
        print(f"  lag to queryable (n={lg['n']}, 1-span exports): send->visible median "
              f"{f(lg['send_to_visible_ms_median'])} ms, p95 {f(lg['send_to_visible_ms_p95'])} ms; ack->visible median "
              f"{f(lg['ack_to_visible_ms_median'])} ms, p95 {f(lg['ack_to_visible_ms_p95'])} ms "
              f"(export rtt {f(lg['export_rtt_ms_median'])} ms, poll query {f(lg['poll_query_ms_median'])} ms)")
        print(f"  collector lag_to_queryable histogram, same samples: mean {f((hist.get('mean_s') or 0) * 1e3)} ms, "
              f"p50 <= {hist.get('p50_le_s')} s, p95 <= {hist.get('p95_le_s')} s")
        if "steady_lag_histogram" in s:
            sh = s["steady_lag_histogram"]
            print(f"  collector lag_to_queryable histogram, steady run: mean {f((sh.get('mean_s') or 0) * 1e3)} ms, "
                  f"p50 <= {sh.get('p50_le_s')} s, p99 <= {sh.get('p99_le_s')} s")
    for name, t in s.get("targets", {}).items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        print(f"  target {name:28s} {verdict:4s}  {t['value']}")
    for run, r in report["runs"].items():
        lg = (r or {}).get("log") or {}
        if lg.get("warnings") or lg.get("errors") or lg.get("tracebacks"):
            print(f"  collector log [{run}]: {lg['warnings']} warnings, {lg['errors']} errors, "
                  f"{lg['tracebacks']} tracebacks (see bench/work/ingest/{run}/collector.log)")
    for run, r in report["runs"].items():
        re_ = (r or {}).get("reader_errors") or {}
        if re_.get("count"):
            print(f"  reader errors [{run}]: {re_['count']} failed reads of the store (retried), "
                  f"e.g. {re_['first'][0][:160]}")
    for run, err in report.get("failures", {}).items():
        print(f"  RUN FAILED [{run}]: {err.strip().splitlines()[-1] if err else err}")
    print(f"  written: {report.get('written')}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (~1.5 min in all) for a smoke check")
    ap.add_argument("--runs", default=",".join(ALL_RUNS), help=f"comma list from {','.join(ALL_RUNS)}")
    ap.add_argument("--duration-s", type=float, default=None, help="steady/ref/overload run length (20; quick 6)")
    ap.add_argument("--kill-duration-s", type=float, default=None, help="kill -9 run length (20; quick 10)")
    ap.add_argument("--kill-at-s", type=float, default=None, help="SIGKILL this far into the kill run (8; quick 4)")
    ap.add_argument("--lag-samples", type=int, default=None, help="one-span exports in the lag run (20; quick 8)")
    ap.add_argument("--lag-gap-s", type=float, default=0.2, help="pause between lag samples")
    ap.add_argument("--spans-per-request", type=int, default=512)
    ap.add_argument("--templates", type=int, default=None, help="harness payload templates per sender (4; quick 2)")
    ap.add_argument("--verify-stable-s", type=float, default=None,
                    help="stored count must stay unchanged this long (harness default 10; quick 3)")
    ap.add_argument("--verify-timeout-s", type=float, default=90.0)
    ap.add_argument("--collector-arg", action="append", default=[],
                    help="extra argument for `tracetrain collector` (repeat), e.g. --collector-arg=--no-fsync")
    ap.add_argument("--out", default=None, help="result file (default bench/results/ingest-<UTC date>[-quick].json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.duration_s = args.duration_s or (6.0 if q else 20.0)
    args.kill_duration_s = args.kill_duration_s or (10.0 if q else 20.0)
    args.kill_at_s = args.kill_at_s or (4.0 if q else 8.0)
    args.lag_samples = args.lag_samples or (8 if q else 20)
    args.templates = args.templates or (2 if q else 4)
    args.verify_stable_s = args.verify_stable_s or (3.0 if q else 10.0)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(ALL_RUNS)
    if unknown:
        ap.error(f"unknown runs: {', '.join(sorted(unknown))}")
    if args.kill_at_s >= args.kill_duration_s:
        ap.error("--kill-at-s must be less than --kill-duration-s")

    shared = shared_bench_dir()
    if WORK_DIR.exists():
        shutil.rmtree(WORK_DIR)
    WORK_DIR.mkdir(parents=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    # SIGTERM/SIGHUP (e.g. make interrupted) must still reach the finally below
    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    started = dt.datetime.now(dt.timezone.utc)
    bench = Bench(args, shared)
    report: dict[str, Any] = {
        "tool": "bench/ingest.py", "mode": "quick" if q else "full",
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([Path(sys.executable).name, "bench/ingest.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "shared_bench": str(shared), "settings": {k: v for k, v in vars(args).items()},
        "machine": machine_info(), "load_before": [round(x, 2) for x in os.getloadavg()],
        "runs": {}, "failures": {},
    }
    env_overrides = sorted(k for k in os.environ if k.startswith(_STRIP_ENV_PREFIXES))
    if env_overrides:
        report["ignored_env"] = env_overrides
    t0 = time.monotonic()
    plan = {
        "steady": lambda: bench.run_ours("steady", 1, 8),
        "ref": lambda: bench.run_ref("ref"),
        "overload": lambda: bench.run_ours("overload", 2, 16),
        "kill9": lambda: bench.run_kill9(),
        "lag": lambda: bench.run_lag(),
    }
    try:
        for run in runs:
            log(f"=== {run}")
            t_run = time.monotonic()
            try:
                report["runs"][run] = plan[run]()
            except Exception as exc:  # noqa: BLE001 - record, go on with the other runs
                import traceback

                log(f"{run} FAILED: {exc}")
                report["failures"][run] = "".join(traceback.format_exception(exc))[-4000:]
                report["runs"].setdefault(run, None)
            finally:
                bench.children.stop_all()  # nothing of this run survives into the next
            if report["runs"].get(run):
                report["runs"][run]["run_wall_s"] = round(time.monotonic() - t_run, 1)
    finally:
        bench.children.stop_all()
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = round(time.monotonic() - t0, 1)
    report["summary"] = summarize(report["runs"])

    date = started.strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else RESULTS_DIR / f"ingest-{date}{'-quick' if q else ''}.json"
    report["written"] = [str(out.relative_to(REPO) if out.is_relative_to(REPO) else out)]
    if not args.out:
        report["written"].append(str((RESULTS_DIR / "ingest-latest.json").relative_to(REPO)))
    text = json.dumps(report, indent=1, default=str) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if not args.out:
        (RESULTS_DIR / "ingest-latest.json").write_text(text)
    print_table(report)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
