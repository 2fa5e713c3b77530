"""Routing overhead per request: decide_think + confidence + bookkeeping, against the 2 ms p95 target.

Two measurements:
1. in-process, the policy calls alone on the reasoning suite's test questions: normalising the thinking
   switches, `decide_think`, `confidence` over a generation's log-probs (64–512 tokens) and
   `should_escalate`, per request;
2. in the server, what it reports itself: `edgedistill.latency_ms.policy` of real chat requests
   (the decide_think + confidence + explanation + metrics time the route spends around generation)
   against the default build's GGUF (or --gguf), served on 127.0.0.1 by uvicorn in this process.

The policy is --router (a router.json) or, without one, a calibrated-shaped policy (all features
weighted, a 256-point isotonic map) so the cost matches a real build's. The last line printed is one
JSON object.

    python bench/routing_overhead.py [--router out/default/router.json] [--gguf PATH] [--requests 200]
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgedistill.data.tasks import generate_suite  # noqa: E402
from edgedistill.routing.features import FEATURE_NAMES  # noqa: E402
from edgedistill.routing.policy import ConfidenceSpec, RoutingPolicy, ThinkSpec  # noqa: E402
from edgedistill.serve.schemas import ChatCompletionRequest  # noqa: E402
from edgedistill.serve.thinking import resolve  # noqa: E402

DEFAULT_GGUF = ROOT / "out/default/export/student-q8_0.gguf"


def shaped_policy() -> RoutingPolicy:
    rng = np.random.default_rng(0)
    n = len(FEATURE_NAMES)
    xs = np.sort(rng.random(256))
    return RoutingPolicy(
        calibrated=True,
        think=ThinkSpec(mean=rng.random(n).tolist(), scale=(1 + rng.random(n)).tolist(),
                        weights=rng.normal(size=n).tolist(), bias=0.1, threshold=0.5, budget=256),
        confidence_map=ConfidenceSpec(weights=[3.0, 0.2, 0.5], bias=1.0, iso_x=xs.tolist(),
                                      iso_y=np.sort(rng.random(256)).tolist()),
        escalation_threshold=0.5)


def pct(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p95_ms": round(float(np.percentile(a, 95)), 4),
            "max_ms": round(float(a.max()), 4), "n": len(ms)}


def in_process(policy: RoutingPolicy, questions: list[str]) -> dict:
    rng = np.random.default_rng(1)
    logprobs = [(-rng.exponential(0.6, size=int(rng.integers(64, 513)))).tolist() for _ in questions]
    reqs = [ChatCompletionRequest(messages=[{"role": "user", "content": q}]) for q in questions]
    for r, lp in zip(reqs[:20], logprobs):  # warm-up
        policy.confidence(lp), policy.decide_think(r.messages[0].content)
    times = []
    for req, lp in zip(reqs, logprobs):
        t0 = time.perf_counter()
        setting, messages = resolve(req, [m.as_template_message() for m in req.messages])
        decision = policy.decide_think(messages[-1]["content"])
        policy.should_escalate(policy.confidence(lp))
        times.append((time.perf_counter() - t0) * 1000)
        assert decision.mode in ("on", "off") and setting.mode == "auto"
    return pct(times)


def in_server(policy: RoutingPolicy, gguf: Path, questions: list[str]) -> dict:
    import httpx
    import uvicorn

    from edgedistill.serve.app import create_app

    app = create_app(gguf, policy=policy, slots=1, ctx_per_slot=512, max_tokens_cap=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        times, thought = [], 0
        with httpx.Client(timeout=120) as http:
            for q in questions:
                body = {"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0}
                ed = http.post(f"{url}/v1/chat/completions", json=body).json()["edgedistill"]
                times.append(ed["latency_ms"]["policy"])
                thought += ed["think_mode"] == "on"
        return {**pct(times), "think_rate": round(thought / len(questions), 3)}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", type=Path, default=None)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    policy = RoutingPolicy.load(args.router) if args.router else shaped_policy()
    questions = [p.question for p in generate_suite({"test": args.requests}, seed=0)["test"]]
    result = {"policy": str(args.router) if args.router else "calibrated-shaped (synthetic weights)",
              "in_process": in_process(policy, questions)}
    print("in-process:", result["in_process"])
    if args.gguf.is_file():
        result["in_server"] = in_server(policy, args.gguf, questions[:max(20, args.requests // 2)])
        result["gguf"] = str(args.gguf)
        print("in-server:", result["in_server"])
    else:
        result["in_server"] = None
        print(f"no GGUF at {args.gguf}: in-server part skipped (pass --gguf)")
    p95 = max(r["p95_ms"] for r in (result["in_process"], result["in_server"]) if r)
    result["target_p95_ms"] = 2.0
    result["meets_target"] = p95 <= 2.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
