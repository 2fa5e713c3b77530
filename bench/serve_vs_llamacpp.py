"""Our server versus llama-cpp-python's server on the same GGUF, under concurrent streaming load.

For each GGUF: N streaming chat requests from C concurrent clients (temperature 0, fixed
max_tokens) against `edgedistill serve` and against `python -m llama_cpp.server` (tuned:
--interrupt_requests False, same thread count), in alternating rounds of C requests; then ours
with one client against llama.cpp called directly in-process (the server's overhead), request
by request alternately. Generated tokens are counted the same way
for both servers: the streamed text re-tokenized by the model's own vocabulary.

Everything binds 127.0.0.1; both servers are child processes stopped at the end. The last line
printed is one JSON object.

    python bench/serve_vs_llamacpp.py [--gguf PATH ...] [--requests 16] [--concurrency 8] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEACHER = Path("~/.cache/edgedistill/models/smollm2-135m-instruct").expanduser()
SCRATCH = Path("/tmp/edgedistill-bench")
DEFAULT_STUDENT = ROOT / "out/default/export/student-q8_0.gguf"  # what `edgedistill build` writes by default
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some tips for learning a new language.",
    "Describe the water cycle to a ten year old.",
    "What makes a good cup of coffee?",
    "Write a poem about autumn leaves.",
    "How do airplanes fly?",
    "Give advice to someone starting their first job.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_q8_0() -> Path:
    """SmolLM2-135M-Instruct as Q8_0, written by our own exporter from the HF checkpoint."""
    out = SCRATCH / "smollm2-135m-instruct-q8_0.gguf"
    if not out.is_file():
        from edgedistill.export.gguf import write_gguf
        SCRATCH.mkdir(parents=True, exist_ok=True)
        write_gguf(TEACHER, out, dtype="q8_0")
    return out


class Server:
    """A server child process on a loopback port, stopped on exit (by its own pid, process group)."""

    def __init__(self, argv: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(SCRATCH / f"server-{port}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not come up; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def ours(gguf: Path, port: int, threads: int, slots: int) -> Server:
    return Server([sys.executable, "-m", "edgedistill.cli", "serve", str(gguf), "--port", str(port),
                   "--threads", str(threads), "--slots", str(slots), "--ctx", "1024", "--no-ui", "--log-level", "warning"], port)


def llama_cpp_server(gguf: Path, port: int, threads: int) -> Server:
    return Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--interrupt_requests", "False", "--n_ctx", "2048"], port)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, text = None, []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        text.append(piece)
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "text": "".join(text)}


async def load(url: str, model: str, n_requests: int, concurrency: int, max_tokens: int,
               first: int = 0) -> tuple[list[dict], float]:
    queue = list(range(first, first + n_requests))
    results: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop(0)
            results.append(await one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 3)


def summarize(results: list[dict], wall: float, count) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(count(r["text"]) for r in ok)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": len(results), "errors": len(results) - len(ok), "empty": sum(1 for r in ok if not r["text"]),
            "generated_tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95)}


def summarize_runs(runs: list[tuple[list[dict], float, float]], count) -> dict:
    """Also tokens per CPU-second of the serving process: on a shared machine the wall-clock rate mostly
    measures how much CPU the scheduler granted, the CPU rate measures the work each token cost."""
    results = [r for rs, _, _ in runs for r in rs]
    out = summarize(results, sum(w for _, w, _ in runs), count)
    cpu = sum(c for _, _, c in runs)
    out["cpu_s"] = round(cpu, 2)
    out["tok_per_cpu_s"] = round(out["generated_tokens"] / cpu, 1) if cpu else None
    return out


def server_round(server: Server, model: str, prompts_from: int, n: int, c: int, max_tokens: int):
    cpu0 = server.cpu_seconds()
    results, wall = asyncio.run(load(server.url, model, n, c, max_tokens, first=prompts_from))
    return results, wall, server.cpu_seconds() - cpu0


class Direct:
    """llama.cpp through llama-cpp-python in this process, one request at a time (no server at all)."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)

    def request(self, prompt: str, max_tokens: int) -> tuple[list[dict], float, float]:
        cpu0 = time.process_time()
        s = time.perf_counter()
        ttft, text = None, []
        for chunk in self.llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                     temperature=0, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - s
                text.append(piece)
        wall = time.perf_counter() - s
        return [{"latency": wall, "ttft": ttft, "text": "".join(text)}], wall, time.process_time() - cpu0


def bench_model(gguf: Path, args: argparse.Namespace) -> dict:
    """Both servers run side by side (idle while the other is measured) and the measurements alternate
    round by round, so drift in the machine's load hits both alike."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    c, mt = args.concurrency, args.max_tokens
    runs: dict[str, list] = {"ours_concurrent": [], "llama_cpp_server_concurrent": [], "ours_1_stream": [],
                             "llama_cpp_direct_1_stream": []}
    with ours(gguf, free_port(), args.threads, c) as mine, llama_cpp_server(gguf, free_port(), args.threads) as anchor:
        models = {s: httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"] for s in (mine, anchor)}
        for s in (mine, anchor):
            server_round(s, models[s], 0, 2, 2, 8)  # warm-up
        for r in range(max(1, args.requests // c)):
            runs["ours_concurrent"].append(server_round(mine, models[mine], r * c, c, c, mt))
            runs["llama_cpp_server_concurrent"].append(server_round(anchor, models[anchor], r * c, c, c, mt))
        direct = Direct(gguf, args.threads)
        for i in range(args.single_requests):
            runs["ours_1_stream"].append(server_round(mine, models[mine], i, 1, 1, mt))
            runs["llama_cpp_direct_1_stream"].append(direct.request(PROMPTS[i % len(PROMPTS)], mt))
        direct.llm.close()
    out: dict = {"gguf": str(gguf), "bytes": gguf.stat().st_size}
    out.update({k: summarize_runs(v, count) for k, v in runs.items()})
    a, b = out["ours_concurrent"], out["llama_cpp_server_concurrent"]
    out["speedup_tok_s"] = round(a["tok_s"] / b["tok_s"], 2) if b["tok_s"] else None
    out["ttft_p95_ratio_ours_over_anchor"] = (round(a["ttft_p95_s"] / b["ttft_p95_s"], 3)
                                              if a["ttft_p95_s"] and b["ttft_p95_s"] else None)
    o1, d1 = out["ours_1_stream"], out["llama_cpp_direct_1_stream"]
    out["overhead_1_stream"] = round(1 - o1["tok_s"] / d1["tok_s"], 3) if d1["tok_s"] else None
    out["speedup_tok_per_cpu_s"] = (round(a["tok_per_cpu_s"] / b["tok_per_cpu_s"], 2)
                                    if a["tok_per_cpu_s"] and b["tok_per_cpu_s"] else None)
    out["overhead_1_stream_cpu"] = (round(1 - o1["tok_per_cpu_s"] / d1["tok_per_cpu_s"], 3)
                                    if o1["tok_per_cpu_s"] and d1["tok_per_cpu_s"] else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, action="append", help="GGUF(s) to serve (default: SmolLM2-135M Q8_0 "
                    "written from the HF teacher, plus the default build's student if it exists)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--single-requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    ggufs = args.gguf or [teacher_q8_0()] + ([DEFAULT_STUDENT] if DEFAULT_STUDENT.is_file() else [])
    load_before = os.getloadavg()[0]
    models = {}
    for g in ggufs:
        models[g.stem] = bench_model(g, args)
        print(json.dumps({g.stem: models[g.stem]}, indent=1), file=sys.stderr)
    conditions = {"cpus": os.cpu_count(), "threads": args.threads, "requests": args.requests,
                  "concurrency": args.concurrency, "single_stream_requests": args.single_requests,
                  "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                  "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                  "anchor": "python -m llama_cpp.server --interrupt_requests False --n_threads T",
                  "tokens": "streamed text re-tokenized by the model's vocabulary"}
    print(json.dumps({"conditions": conditions, "models": models}))


if __name__ == "__main__":
    main()
