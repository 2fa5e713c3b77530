"""Reliability figures for issue 6: fuzzing, injected faults, a soak, and build crash-resume.

1. fuzz: schemathesis cases (valid and invalid) from the server's own OpenAPI schema, plus the tests'
   hand-written malformed requests, against a real uvicorn serving a tiny random GGUF; per-request timeout
   (a request unanswered in time is a hang). The server must still answer afterwards.
2. faults: a real local model server (tests/fault_server.py) down, slow past the timeout, answering 500/429,
   stalling, cutting its stream, sending garbage or an error event; driven through RemoteBackend and through
   our server's `--llm` path (streamed and not), plus a small-model backend that raises or goes silent. A
   fault is survived when the request ends within its timeout in a clean error (never finish_reason "stop"
   on a cut answer) and the small model still answers right after; routed requests that the policy
   escalates to the faulty --llm must come back with the small model's complete answer.
3. soak: `edgedistill serve` (child process) on the tiny GGUF, 8 concurrent clients for --soak-seconds after
   a warm-up; errors, server RSS growth (after warm-up vs end), p95 latency in the first vs last minute.
4. crash-resume: `edgedistill build` on a tiny recipe (ONNX included) killed with SIGKILL in every stage in
   turn, each rerun resuming; the final manifest is compared with a clean build's.

    python bench/reliability.py [--examples 220] [--soak-seconds 300] [--quick]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

import httpx  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- 1. fuzzing
def run_fuzz(gguf: Path, examples: int) -> dict:
    from edgedistill.serve.app import create_app
    from live_server import serving
    from reliability_kit import fuzz_api
    from test_fuzz_api import MALFORMED

    t0 = time.monotonic()
    with serving(create_app(gguf, max_tokens_cap=8, slots=4, ctx_per_slot=256, n_threads=1)) as url:
        report = fuzz_api(url, examples=examples, timeout=30)
        malformed_5xx = malformed_hangs = 0
        for route, body, content_type, _ in MALFORMED:
            try:
                r = httpx.post(url + route, content=body.encode() if isinstance(body, str) else body,
                               headers={"content-type": content_type}, timeout=30)
                malformed_5xx += r.status_code >= 500
            except httpx.TimeoutException:
                malformed_hangs += 1
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 4}, timeout=30)
        alive = r.status_code == 200 and httpx.get(f"{url}/health", timeout=10).status_code == 200
    for line in report.failures[:10]:
        say(f"  fuzz failure: {line}")
    return {"fuzzed_requests": report.requests, "malformed_requests": len(MALFORMED),
            "responses_5xx": report.responses_5xx + malformed_5xx, "hangs": report.hangs + malformed_hangs,
            "fuzz_status_counts": {str(k): v for k, v in sorted(report.by_status.items())},
            "server_alive_after_fuzz": alive, "fuzz_seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------- 2. faults
def run_faults(gguf: Path, tmp: Path, timeout: float = 2.0) -> dict:
    import openai

    from edgedistill.errors import ServeError
    from edgedistill.serve.app import create_app
    from edgedistill.serve.backend import Prompt, generate
    from edgedistill.serve.events import SamplingParams
    from edgedistill.serve.remote import RemoteBackend
    from fault_server import FAULTS, FaultyModelServer, closed_port
    from live_server import serving
    from test_faults import BrokenBackend

    budget = timeout + 6.0  # the configured timeout, one retry's backoff and scheduling on a loaded machine
    injected, survived, failures = 0, 0, []

    def record(name: str, ok: bool, elapsed: float) -> None:
        nonlocal injected, survived
        injected += 1
        ok = ok and elapsed < budget
        survived += ok
        if not ok:
            failures.append(f"{name} ({elapsed:.1f} s)")

    server = FaultyModelServer(slow_s=timeout + 3)
    with serving(server.app) as url:
        server.mode = "ok"
        app = create_app(gguf, llm=f"{url}/v1", large_timeout_s=timeout, max_tokens_cap=16, slots=2, ctx_per_slot=256,
                         n_threads=1)
        with serving(app) as ours:
            oa = openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)
            for mode in (*FAULTS, "down"):
                server.mode = "ok" if mode == "down" else mode
                base = f"http://127.0.0.1:{closed_port()}/v1" if mode == "down" else f"{url}/v1"
                # (a) RemoteBackend directly
                remote = RemoteBackend(base, model="big-llm", timeout=timeout, retries=1, backoff_s=0.05)
                t0 = time.monotonic()
                try:
                    generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=8), timeout=60)
                    ok = False  # a fault must not look like an answer
                except ServeError:
                    ok = True
                remote.close()
                record(f"RemoteBackend/{mode}", ok, time.monotonic() - t0)
                # (b) through our server, not streamed and streamed
                app.state.service.backends["big-llm"].base_url = base.rstrip("/")
                t0 = time.monotonic()
                try:
                    oa.chat.completions.create(model="big-llm", messages=HI, max_tokens=8)
                    ok = False
                except openai.APIStatusError as e:
                    ok = e.status_code in (500, 502, 504) and e.response.json()["error"]["type"] == "server_error"
                record(f"server/{mode}", ok, time.monotonic() - t0)
                t0, finishes = time.monotonic(), []
                try:
                    for chunk in oa.chat.completions.create(model="big-llm", messages=HI, max_tokens=8, stream=True):
                        finishes += [c.finish_reason for c in chunk.choices]
                    ok = False
                except openai.APIError:
                    ok = not any(finishes)
                small = oa.chat.completions.create(model=gguf.stem, messages=HI, max_tokens=4)
                record(f"server-stream/{mode}", ok and small.choices[0].finish_reason in ("stop", "length"),
                       time.monotonic() - t0)
                app.state.service.backends["big-llm"].base_url = f"{url}/v1"
        # (c) routed requests that the policy always escalates to the faulty --llm: the small model's answer
        from edgedistill.routing.policy import RoutingPolicy
        always = RoutingPolicy(calibrated=True, escalation_threshold=1.01)
        app = create_app(gguf, llm=f"{url}/v1", policy=always, large_timeout_s=timeout, max_tokens_cap=16, slots=2,
                         ctx_per_slot=256, n_threads=1)
        with serving(app) as ours:
            oa = openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)
            for mode in FAULTS:
                server.mode = mode
                t0 = time.monotonic()
                r = oa.chat.completions.create(model=gguf.stem, messages=HI, max_tokens=6, temperature=0)
                ed = r.model_extra["edgedistill"]
                record(f"escalation/{mode}", ed["escalated"] and ed["answered_by"] == gguf.stem
                       and r.choices[0].finish_reason in ("stop", "length"), time.monotonic() - t0)
    for how in ("start", "dies"):
        with serving(create_app(tmp, backend=BrokenBackend(how), stall_timeout_s=timeout)) as url:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI}, timeout=60)
            ok = r.status_code in (500, 504) and r.json()["error"]["type"] == "server_error"
            record(f"small-backend/{how}", ok and httpx.get(f"{url}/health").status_code == 200,
                   time.monotonic() - t0)
    for f in failures:
        say(f"  fault not survived: {f}")
    return {"faults_injected": injected, "faults_survived": survived, "fault_timeout_s": timeout}


# ---------------------------------------------------------------- 3. soak
def run_soak(gguf: Path, seconds: float, warmup: float) -> dict:
    from reliability_kit import cli_server, soak

    with cli_server(gguf, "--no-ui", "--threads", "1", "--slots", "8", "--ctx", "256", "--log-level", "warning") as s:
        rep = soak(s.url, server_pid=s.pid, clients=8, seconds=seconds, warmup_s=warmup,
                   window_s=min(60.0, seconds / 4), max_tokens=16)
    for e in rep.error_samples:
        say(f"  soak error: {e}")
    return {"soak_seconds": rep.seconds, "soak_clients": 8, "soak_requests": rep.requests, "soak_errors": rep.errors,
            "rss_start_mb": round(rep.rss_start / 2**20, 1), "rss_end_mb": round(rep.rss_end / 2**20, 1),
            "rss_growth_pct": round(rep.rss_growth_pct, 2), "p95_first_window_s": round(rep.p95_first_s, 4),
            "p95_last_window_s": round(rep.p95_last_s, 4)}


# ---------------------------------------------------------------- 4. crash-resume
def run_crash_resume(teacher: Path, tmp: Path) -> dict:
    from edgedistill.build import STAGE_ORDER
    from reliability_kit import crash_resume, tiny_build_recipe

    t0 = time.monotonic()
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = tiny_build_recipe(tmp / "tiny.yaml", teacher, onnx=True)
    rep = crash_resume(recipe, tmp / "resumed", tmp / "clean", STAGE_ORDER)
    for p in rep.problems:
        say(f"  crash-resume problem: {p}")
    return {"crash_resume_ok": rep.ok, "crash_resume_stages_killed": rep.stages_killed,
            "crash_resume_deterministic_equal": rep.deterministic_equal,
            "crash_resume_other_equal": rep.other_equal, "crash_resume_differing_files": rep.differing_files,
            "crash_resume_seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=220, help="schemathesis cases per operation and mode")
    ap.add_argument("--soak-seconds", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: few cases, 30 s soak")
    ap.add_argument("--skip", nargs="*", default=[], choices=["fuzz", "faults", "soak", "crash"])
    args = ap.parse_args()
    if args.quick:
        args.examples, args.soak_seconds = 10, 30.0
    from conftest import make_tiny_llama, train_tokenizer
    from edgedistill.export.gguf import write_gguf

    tmp = Path(tempfile.mkdtemp(prefix="edgedistill-reliability-"))
    result: dict = {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start (shared)"}
    try:
        teacher = make_tiny_llama(tmp / "tiny-llama", train_tokenizer())
        gguf = tmp / "tiny.gguf"
        write_gguf(teacher, gguf, dtype="f16")
        for name, step in (("fuzz", lambda: run_fuzz(gguf, args.examples)), ("faults", lambda: run_faults(gguf, tmp)),
                           ("soak", lambda: run_soak(gguf, args.soak_seconds, warmup=20.0 if not args.quick else 5.0)),
                           ("crash", lambda: run_crash_resume(teacher, tmp / "build"))):
            if name in args.skip:
                continue
            say(f"== {name}")
            t0 = time.monotonic()
            out = step()
            say(f"   {json.dumps(out)}  ({time.monotonic() - t0:.0f} s)")
            result.update(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    keys = ["fuzzed_requests", "responses_5xx", "hangs", "faults_injected", "faults_survived", "soak_seconds",
            "soak_errors", "rss_growth_pct", "crash_resume_ok"]
    print(json.dumps({**{k: result.get(k) for k in keys}, **{k: v for k, v in result.items() if k not in keys}}))


if __name__ == "__main__":
    threading.excepthook = lambda a: None if "fault injected" in str(a.exc_value) else sys.__excepthook__(
        a.exc_type, a.exc_value, a.exc_traceback)
    main()
