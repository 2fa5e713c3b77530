"""What `--workers` buys: one llama.cpp instance batching 8 sequences versus N instances sharing them.

Configurations are WORKERSxTHREADS (threads per worker): 1x2 (one instance, both cores), 1x1, 2x1 (two
single-thread instances). The same GGUF, the same total slots (8, split over the workers), C concurrent
streaming clients, temperature 0, fixed max_tokens; the configurations alternate round by round so drift
in the machine's load hits them alike. Reuses serve_vs_llamacpp's client and summaries.
The last line printed is one JSON object.

    python bench/serve_workers.py [--gguf PATH] [--configs 1x2 1x1 2x1] [--rounds 3] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_llamacpp import (DEFAULT_STUDENT, SCRATCH, Server, free_port, server_round,  # noqa: E402
                               summarize_runs)


def ours(gguf: Path, port: int, threads: int, workers: int, slots: int) -> Server:
    return Server([sys.executable, "-m", "edgedistill.cli", "serve", str(gguf), "--port", str(port),
                   "--threads", str(threads), "--workers", str(workers), "--slots", str(slots), "--ctx", "1024",
                   "--no-ui", "--log-level", "warning"], port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_STUDENT)
    ap.add_argument("--configs", nargs="+", default=["1x2", "1x1", "2x1"], help="WORKERSxTHREADS_PER_WORKER")
    ap.add_argument("--total-slots", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    from llama_cpp import Llama

    vocab = Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    load_before = os.getloadavg()
    configs = {c: tuple(int(x) for x in c.split("x")) for c in args.configs}
    servers = {c: ours(args.gguf, free_port(), w * t, w, max(1, args.total_slots // w)) for c, (w, t) in configs.items()}
    runs: dict[str, list] = {c: [] for c in configs}
    try:
        for s in servers.values():
            s.__enter__()
        import httpx
        model = {w: httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"] for w, s in servers.items()}
        for w, s in servers.items():
            server_round(s, model[w], 0, 2, 2, 8)  # warm-up
        c = args.concurrency
        for r in range(args.rounds):
            for w, s in servers.items():
                runs[w].append(server_round(s, model[w], r * c, c, c, args.max_tokens))
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
    out = {"gguf": str(args.gguf), "total_slots": args.total_slots, "cpus": os.cpu_count(),
           "concurrency": args.concurrency, "max_tokens": args.max_tokens, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(),
           "configs": {c: summarize_runs(v, count) for c, v in runs.items()}}
    for c, v in out["configs"].items():
        print(f"{c} (workers x threads): {v['tok_s']} tok/s, p95 latency {v['latency_p95_s']} s, p95 TTFT {v['ttft_p95_s']} s, "
              f"{v['tok_per_cpu_s']} tok/CPU-s, errors {v['errors']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
