"""Policy overhead per request: decide_think on the prompt + confidence on the answer's log-probs + should_escalate.

    python bench/routing_policy.py [ROUTER_JSON_OR_BUILD_DIR] [--n 2000]

Uses the build's router.json when given, else the default policy. Prompts are the suite's held-out
problems; answers are 60 log-probs each (a typical thinking answer). Prints p50/p95/p99 in ms, and last
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgedistill.data.tasks import generate_suite
from edgedistill.routing.policy import RoutingPolicy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("router", nargs="?")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    policy = RoutingPolicy.load(a.router) if a.router else RoutingPolicy.default()
    prompts = [p.question for p in generate_suite({"test": 200}, seed=1)["test"]]
    rng = np.random.default_rng(0)
    answers = [list(np.minimum(rng.normal(-0.3, 0.5, size=60), 0.0)) for _ in range(50)]
    times = []
    for i in range(a.n):
        t0 = time.perf_counter()
        policy.decide_think(prompts[i % len(prompts)])
        policy.should_escalate(policy.confidence(answers[i % len(answers)]))
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    out = {"bench": "routing_policy_overhead", "router": a.router or "default", "n": a.n,
           "p50_ms": round(float(np.percentile(ms, 50)), 4), "p95_ms": round(float(np.percentile(ms, 95)), 4),
           "p99_ms": round(float(np.percentile(ms, 99)), 4)}
    print(f"p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms, p99 {out['p99_ms']} ms over {a.n} requests")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
