"""Process, HTTP and metrics plumbing for bench/ingest.py (kept apart to stay readable)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS_DIR = BENCH / "results"
WORK_DIR = BENCH / "work" / "ingest"
PROBE = BENCH / "store_probe.py"
ALL_RUNS = ("steady", "ref", "overload", "kill9", "lag")
PACKAGES = ("grpcio", "protobuf", "pyarrow", "duckdb", "opentelemetry-proto", "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-grpc", "prometheus-client", "tracetrain")

HIST_KEYS = ("count", "mean_s", "p50_le_s", "p95_le_s", "p99_le_s")

# The targets of shared/notes/peer-ingest.md section 7 (also in bench/README.md).
TARGET_US_PER_SPAN = 50.0
TARGET_P99_MS = 500.0
TARGET_OVERLOAD_RSS_MB = 500.0

# Proxies would send the harness's gRPC channel and our urllib calls off loopback;
# TRACETRAIN_COLLECTOR_* would silently change the configuration under test.
_STRIP_ENV_PREFIXES = ("TRACETRAIN_COLLECTOR_",)
_STRIP_ENV = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shared_bench_dir() -> Path:
    override = os.environ.get("TRACETRAIN_SHARED_BENCH")
    if override:
        path = Path(override).expanduser().resolve()
    else:
        path = Path(__file__).resolve().parents[2] / "shared" / "bench"
    missing = [n for n in ("ingest_bench.py", "ref_receiver.py") if not (path / n).is_file()]
    if missing:
        sys.exit(f"bench/ingest.py: {', '.join(missing)} not found in {path} "
                 f"(set TRACETRAIN_SHARED_BENCH to the folder holding the shared harness)")
    return path


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _STRIP_ENV and not k.startswith(_STRIP_ENV_PREFIXES)}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 2.0) -> bytes:
    with _HTTP.open(url, timeout=timeout_s) as r:
        return r.read()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    # nearest rank, as the harness does
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def r1(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# --------------------------------------------------------------------------- child processes


class Children:
    """Every process this script starts, each in its own session (process group),
    so that stop_all() can end it and whatever it forked."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.pidfiles: list[Path] = []
        self._lock = threading.Lock()

    def spawn(self, name: str, cmd: list[str], logfile: Path | None = None, **kw: Any) -> subprocess.Popen:
        out = open(logfile, "ab") if logfile else subprocess.DEVNULL
        try:
            p = subprocess.Popen(cmd, stdout=kw.pop("stdout", out), stderr=kw.pop("stderr", subprocess.STDOUT),
                                 start_new_session=True, env=child_env(), **kw)
        finally:
            if logfile:
                out.close()
        with self._lock:
            self.procs.append((name, p))
        return p

    def watch_pidfile(self, path: Path) -> None:
        """A process started by someone else (the harness's --restart-cmd) that writes its pid here."""
        self.pidfiles.append(path)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)  # a session leader's pgid is its pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, p: subprocess.Popen, grace_s: float = 45.0) -> tuple[int | None, float]:
        """SIGTERM the process group, wait, then SIGKILL. Returns (exit code, seconds to exit)."""
        t0 = time.monotonic()
        if p.poll() is None:
            self._signal_group(p.pid, signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(p.pid, signal.SIGKILL)
                p.wait(10)
        # anything it left behind in its group
        self._signal_group(p.pid, signal.SIGKILL)
        return p.returncode, time.monotonic() - t0

    def stop_pid(self, pid: int, grace_s: float = 45.0) -> tuple[int | None, float]:
        """Stop a process that is not our child (so no exit code): SIGTERM, wait, SIGKILL."""
        t0 = time.monotonic()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not _alive(pid):
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
        return None, time.monotonic() - t0

    def stop_all(self) -> None:
        """Stop everything still running; each process is forgotten once stopped."""
        for path in self.pidfiles:
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _alive(pid):
                log(f"cleanup: stopping pid {pid} from {path.name}")
                self.stop_pid(pid, grace_s=15)
        self.pidfiles.clear()
        with self._lock:
            procs, self.procs = self.procs, []
        for name, p in reversed(procs):
            if p.poll() is None:
                log(f"cleanup: stopping {name} (pid {p.pid})")
            # also SIGKILLs strays left in its process group, if any
            self.stop(p, grace_s=15)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, logfile: Path | None = None) -> float:
    """Poll url until it answers 200; return seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            http_get(url, 1.0)
            return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s")


class HealthWatch(threading.Thread):
    """Polls /healthz every 0.1 s during the kill -9 run to time the outage."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop_evt = url, threading.Event()
        self.t0 = time.monotonic()
        self.down_at: float | None = None
        self.up_again_at: float | None = None

    def run(self) -> None:
        while not self.stop_evt.wait(0.1):
            try:
                http_get(self.url, 0.5)
                ok = True
            except (urllib.error.URLError, OSError):
                ok = False
            t = time.monotonic() - self.t0
            if not ok and self.down_at is None:
                self.down_at = t
            elif ok and self.down_at is not None and self.up_again_at is None:
                self.up_again_at = t

    def result(self) -> dict[str, float | None]:
        return {"healthz_down_at_s": r1(self.down_at, 2), "healthz_up_again_at_s": r1(self.up_again_at, 2),
                "healthz_outage_s": r1(self.up_again_at - self.down_at, 2)
                if self.down_at is not None and self.up_again_at is not None else None}


# --------------------------------------------------------------------------- metrics


def scrape_metrics(url: str) -> dict[str, Any]:
    """The collector's /metrics as {name: value} for counters/gauges and
    {name: {"buckets": [[le, cumulative]], "count", "sum", quantiles}} for histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(url, 5.0).decode()
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram":
            h: dict[str, Any] = {"buckets": []}
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    h["buckets"].append([s.labels["le"], s.value])
                elif s.name.endswith("_count"):
                    h["count"] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
            if h.get("count"):
                h["mean_s"] = h["sum"] / h["count"]
                for q in (0.5, 0.95, 0.99):
                    h[f"p{int(q * 100)}_le_s"] = _hist_quantile(h["buckets"], h["count"], q)
            out[fam.name] = h
        else:
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                                if s.labels else "")
                out[key] = s.value
    return out


def hist_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """after - before of one histogram (the observations made in between)."""
    if not after:
        return None
    prev = {le: c for le, c in (before or {}).get("buckets", [])}
    buckets = [[le, c - prev.get(le, 0.0)] for le, c in after["buckets"]]
    h: dict[str, Any] = {"buckets": buckets, "count": after.get("count", 0) - (before or {}).get("count", 0),
                         "sum": after.get("sum", 0) - (before or {}).get("sum", 0)}
    if h["count"]:
        h["mean_s"] = h["sum"] / h["count"]
        for q in (0.5, 0.95, 0.99):
            h[f"p{int(q * 100)}_le_s"] = _hist_quantile(buckets, h["count"], q)
    return h


def _hist_quantile(buckets: list[list[Any]], count: float, q: float) -> float | str:
    """Upper bound of the bucket holding the q-quantile (no interpolation)."""
    for le, cum in buckets:
        if cum >= q * count:
            return float(le) if le != "+Inf" else "+Inf"
    return "+Inf"


def scan_log(path: Path) -> dict[str, Any]:
    """Warnings, errors and tracebacks in a collector log."""
    if not path.exists():
        return {"exists": False}
    lines = path.read_text(errors="replace").splitlines()
    flagged = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln
               or ln.startswith("Traceback") or "Exception" in ln]
    return {"lines": len(lines), "warnings": sum(" WARNING " in ln for ln in lines),
            "errors": sum(" ERROR " in ln or " CRITICAL " in ln for ln in lines),
            "tracebacks": sum(ln.startswith("Traceback") for ln in lines),
            "flagged_first": flagged[:15]}


def probe_count(data: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(PROBE), "count", str(data), "--json"], capture_output=True,
                         text=True, timeout=300, env=child_env())
    if out.returncode != 0:
        return {"error": out.stderr[-1000:]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if out.stderr.strip():
        res["stderr"] = out.stderr[-1000:]
    return res


# --------------------------------------------------------------------------- servers
