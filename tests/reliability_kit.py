"""Reliability harnesses shared by the tests (short runs) and bench/reliability.py (long runs).

- `fuzz_api`: schemathesis cases generated from the server's own OpenAPI schema (valid and invalid
  requests), sent over real HTTP with a per-request timeout; counts 5xx answers and hangs.
- `soak`: N concurrent streaming clients for a fixed time; errors, latency per window, server RSS.
Everything talks to a real server on a loopback port.
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HANG_TIMEOUT_S = 30.0  # a request unanswered this long counts as a hang


# ---------------------------------------------------------------- `edgedistill serve` as a child process
@dataclass
class CliServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def cli_server(target: Path, *args: str, startup_s: float = 120.0):
    """`edgedistill serve TARGET --port <free> ARGS...` as a child process (stdout+stderr to a file); yields a
    CliServer once /health answers, and stops it (SIGTERM, then SIGKILL) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="edgedistill-serve-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "serve", str(target), "--port", str(port),
                                 *args], stdout=out, stderr=subprocess.STDOUT, text=True)
    server = CliServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            assert proc.poll() is None, f"the server exited: {server.output()[-3000:]}"
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up: {server.output()[-3000:]}"
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- fuzzing
@dataclass
class FuzzReport:
    requests: int = 0
    responses_5xx: int = 0
    hangs: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # one line per 5xx / hang / non-JSON error, for the message

    def merge_status(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


def fuzz_api(base_url: str, *, examples: int, timeout: float = HANG_TIMEOUT_S, seed: int = 0,
             headers: dict[str, str] | None = None) -> FuzzReport:
    """Up to `examples` positive and `examples` negative cases per operation of `base_url`'s OpenAPI schema."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hseed(seed)
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def send(case) -> None:
                report.requests += 1
                label = f"{mode.value} {case.method} {case.formatted_path} body={str(case.body)[:200]!r}"
                try:
                    r = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout)
                except requests.Timeout:
                    report.hangs += 1
                    report.failures.append(f"hang (> {timeout}s): {label}")
                    return
                report.merge_status(r.status_code)
                if r.status_code >= 500:
                    report.responses_5xx += 1
                    report.failures.append(f"{r.status_code}: {label} -> {r.text[:300]}")
                elif r.status_code >= 400 and "error" not in _json_or_none(r):
                    report.failures.append(f"{r.status_code} without an OpenAI error object: {label} -> {r.text[:200]}")
            try:
                send()
            except Unsatisfiable:  # nothing invalid to generate for an operation without inputs
                pass
    return report


def _json_or_none(r) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# ---------------------------------------------------------------- soak
def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class SoakReport:
    seconds: float
    requests: int
    errors: int
    error_samples: list[str]
    p95_first_s: float
    p95_last_s: float
    rss_start: int
    rss_end: int

    @property
    def rss_growth_pct(self) -> float:
        return 100.0 * (self.rss_end - self.rss_start) / self.rss_start


PROMPTS = ["def add(a, b):", "Explain a list.", "import os", "class Point:", "Write a loop.", "hello there",
           "for i in range(10):", "What is a dict?"]


def soak(base_url: str, *, server_pid: int, clients: int = 8, seconds: float = 20.0, warmup_s: float = 3.0,
         window_s: float | None = None, max_tokens: int = 16, timeout: float = HANG_TIMEOUT_S) -> SoakReport:
    """`clients` threads send streaming and non-streaming chat requests back to back for `warmup_s` + `seconds`.
    RSS is read after the warm-up and at the end; p95 latency is compared over the first and last `window_s`
    (default a quarter of the run) of the measured part. Every request must end in a 200 with a complete
    answer (a finish_reason and, for streams, `[DONE]`)."""
    window_s = window_s or seconds / 4
    stop_at = [0.0]
    lock = threading.Lock()
    samples: list[tuple[float, float]] = []  # (finished at, latency)
    errors: list[str] = []
    measuring = threading.Event()

    def client(i: int) -> None:
        n = 0
        with httpx.Client(timeout=timeout) as http:
            while time.monotonic() < stop_at[0]:
                n += 1
                body = {"messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": n, "stream": bool(n % 2)}
                t0 = time.monotonic()
                try:
                    problem = _one_request(http, base_url, body)
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                t1 = time.monotonic()
                with lock:
                    if problem:
                        errors.append(problem)
                    elif measuring.is_set():
                        samples.append((t1, t1 - t0))

    stop_at[0] = time.monotonic() + warmup_s + seconds
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    rss_start = rss_bytes(server_pid)
    measuring.set()
    t_start = time.monotonic()
    for t in threads:
        t.join(timeout=warmup_s + seconds + timeout + 5)
    hung = sum(t.is_alive() for t in threads)
    rss_end = rss_bytes(server_pid)
    t_end = t_start + seconds
    first = [lat for at, lat in samples if at <= t_start + window_s]
    last = [lat for at, lat in samples if at >= t_end - window_s]
    return SoakReport(seconds=seconds, requests=len(samples) + len(errors), errors=len(errors) + hung,
                      error_samples=errors[:5] + [f"{hung} clients hung"] * bool(hung),
                      p95_first_s=_p95(first), p95_last_s=_p95(last), rss_start=rss_start, rss_end=rss_end)


def _one_request(http: httpx.Client, base_url: str, body: dict) -> str | None:
    url = f"{base_url}/v1/chat/completions"
    if not body["stream"]:
        r = http.post(url, json=body)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        finish = r.json()["choices"][0]["finish_reason"]
        return None if finish in ("stop", "length") else f"finish_reason {finish!r}"
    import json
    finish, done = None, False
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            return f"HTTP {r.status_code}: {r.text[:200]}"
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return f"stream error: {chunk['error']}"
                for c in chunk.get("choices") or []:
                    finish = c.get("finish_reason") or finish
    return None if done and finish in ("stop", "length") else f"incomplete stream (finish {finish!r}, done {done})"


def _p95(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=20)[-1]


def tiny_gguf(dest: Path, *, tokenizer=None) -> Path:
    """A tiny random Llama (conftest's) written as an f16 GGUF: a real model llama.cpp serves in milliseconds."""
    from conftest import make_tiny_llama, train_tokenizer

    from edgedistill.export.gguf import write_gguf

    dest.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_llama(dest / "hf", tokenizer or train_tokenizer())
    out = dest / "tiny-f16.gguf"
    write_gguf(model_dir, out, dtype="f16")
    return out


# ---------------------------------------------------------------- build crash-resume
# Stages whose outputs are a pure function of their inputs on one machine: the resumed build must match a
# clean one bit for bit. Not here: `teacher` (no outputs), `eval` (no outputs; its metrics include measured
# decode tokens/s), `devices` (the `host` profile measures this machine's bandwidth and GEMM rate, so
# device.json differs run to run), `report` (report.md / report.png show timings), and the routing stages
# (hybrid_teacher, hybrid_student, routing: off in the tiny recipe, so they write nothing).
DETERMINISTIC_STAGES = ("student_init", "distill", "compress", "export")


def tiny_build_recipe(path: Path, teacher_dir: Path, *, onnx: bool = True) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({
        "name": "tiny", "teacher": {"model": str(teacher_dir)}, "student": {"calib_windows": 2},
        "data": {"max_chars": 60_000},
        "distill": {"steps": 4, "batch_size": 2, "seq_len": 64, "lr": 2e-3, "warmup_steps": 1},
        "export": {"onnx": onnx}, "eval": {"windows": 2, "seq_len": 64, "decode_tokens": 0},
        # the routing stages still run (and are killed and resumed) but do no work: minutes of training otherwise
        "routing": {"enabled": False}}))
    return path


def _build_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgedistill.cli", "build", str(recipe), "--out", str(out)]


def run_build_cli(recipe: Path, out: Path, timeout: float = 600) -> str:
    r = subprocess.run(_build_cmd(recipe, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


def build_killed_in(stage: str, recipe: Path, out: Path, timeout: float = 600) -> str:
    """Run the build with the test pause hook on `stage`; kill -9 it once it pauses there. Returns its output."""
    import signal
    env = {**os.environ, "EDGEDISTILL_TEST_PAUSE_STAGE": stage, "PYTHONUNBUFFERED": "1"}
    log = out.parent / f"{out.name}-{stage}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_build_cmd(recipe, out), stdout=f, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + timeout
    try:
        while f"paused in {stage}" not in log.read_text():
            assert proc.poll() is None, f"the build ended before pausing in {stage}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no pause in {stage} within {timeout} s"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def stage_records(out: Path) -> dict:
    import json
    return json.loads((out / "manifest.json").read_text())["stages"]


@dataclass
class CrashResumeReport:
    stages_killed: list[str]
    problems: list[str]
    deterministic_equal: dict[str, bool]
    other_equal: dict[str, bool]
    differing_files: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(self.deterministic_equal.values())


def crash_resume(recipe: Path, out: Path, clean_out: Path, stages: list[str]) -> CrashResumeReport:
    """kill -9 the build once in each of `stages` (in order), each run resuming the last; then finish it and
    compare with a clean build (run alongside, in its own process). Checks after every kill: the manifest is
    valid, stages before the killed one are recorded with intact outputs, the killed one is not; the next run
    skips (does not recompute) all of them."""
    from edgedistill.artifacts import Manifest
    clean_run = subprocess.Popen(_build_cmd(recipe, clean_out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        report = _kill_in_each(recipe, out, stages, Manifest)
    finally:
        clean_log, _ = clean_run.communicate(timeout=900)
    assert clean_run.returncode == 0, clean_log[-3000:]
    resumed, clean = stage_records(out), stage_records(clean_out)
    files = {s: {o["path"]: o["sha256"] for o in resumed[s]["outputs"]} for s in resumed}
    differing = sorted(o["path"] for s in clean for o in clean[s]["outputs"] if files.get(s, {}).get(o["path"]) != o["sha256"])
    same = {s: files.get(s) == {o["path"]: o["sha256"] for o in clean[s]["outputs"]} for s in clean}
    return CrashResumeReport(stages, report, {s: same[s] for s in DETERMINISTIC_STAGES},
                             {s: v for s, v in same.items() if s not in DETERMINISTIC_STAGES}, differing)


def _kill_in_each(recipe: Path, out: Path, stages: list[str], Manifest) -> list[str]:
    problems: list[str] = []
    before: dict = {}
    for i, stage in enumerate(stages):
        text = build_killed_in(stage, recipe, out)
        for done in stages[:max(i - 1, 0)]:  # stages[i - 1] was killed before it was recorded: it runs again
            if f"✓ {done}: up to date, skipped" not in text:
                problems.append(f"after the kill in {stages[i - 1]}, {done} was recomputed instead of skipped")
        try:
            recs = stage_records(out)
        except (OSError, ValueError) as e:
            problems.append(f"killed in {stage}: manifest unreadable ({e})")
            continue
        if stage in recs:
            problems.append(f"killed in {stage}: the manifest records it as done")
        manifest = Manifest(out)
        for done in stages[:i]:
            if recs.get(done, {}).get("status") != "done" or not manifest.outputs_intact(done):
                problems.append(f"killed in {stage}: earlier stage {done} lost or damaged")
            elif done in before and recs[done]["finished_at"] != before[done]:
                problems.append(f"killed in {stage}: {done} was run again")
            before.setdefault(done, recs[done]["finished_at"] if done in recs else None)
    text = run_build_cli(recipe, out)
    for done in stages[:-1]:
        if f"✓ {done}: up to date, skipped" not in text:
            problems.append(f"final run recomputed {done}")
    if not (out / "manifest.json").is_file() or any(p.name.endswith(".tmp") for p in out.glob(".*")):
        problems.append("temporaries left behind after the resumed build")
    return problems
