"""One GPU: a naive KD step vs ours vs Liger-Kernel's fused linear JSD (forward KL in all three).

Student shaped like SmolLM2-360M (hidden 960, 32 layers, 15 heads, 5 KV heads, FFN 2560, vocab 49152,
tied), random init, fp32 master weights; teacher shaped like SmolLM2-1.7B (hidden 2048, 24 layers,
32 heads, FFN 8192), bf16, frozen. Batch 8 × 1024 random tokens, bf16 autocast, fused AdamW in every row.

  naive  full logits of both models, kl_div over log_softmax (fp32)
  ours   edgedistill.distill.losses.kd_loss: chunked, gradient formed in the forward pass; options as in the
         engine (distill/layers.py): +compile (torch.compile of each block of both models and of the loss's
         chunk arithmetic), +ckpt (gradient checkpointing of every student block) or +ckptN (of the first N),
         +chunkN (loss chunk of N tokens; default 2048), +cg (compile with CUDA graphs: "reduce-overhead", for a
         host where kernel launches are slow, e.g. a sandboxed one), +budgetNN (compile's activation memory
         budget, NN% of what its partitioner would save: it recomputes the cheapest activations, pointwise first)
  liger  LigerFusedLinearJSD(jsd_beta=0.0) on the last hidden states and lm_head weights

Reported per row: tokens/s, peak GiB (torch.cuda.max_memory_allocated from before the warm-up steps, so that
CUDA-graph rows count their graphs' memory pools: a replay writes into memory the allocator handed out while
recording, and a peak reset after recording would miss it; `reserved_gib`, the allocator's peak reservation,
is the cross-check), model TFLOP/s
((6·N_student + 2·N_teacher)·tokens / time) and its fraction of a measured 8192³ bf16 matmul.
Needs a CUDA build of torch, transformers and (for the third row) liger-kernel + triton: the GPU
machine has no package index, so carry their wheels. `--smoke` runs tiny shapes on CPU (no Liger).

    python bench/distill_gpu.py [--steps 10] [--rows naive,liger,ours,ours+compile,ours+compile+ckpt8] [--out f.json]
    # last line: JSON; --out also rewrites the JSON after every row, so a run cut short keeps what it measured
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgedistill.distill.layers import patch_layers  # noqa: E402
from edgedistill.distill.losses import DenseTeacher, LossSpec, kd_loss  # noqa: E402

FULL = {"student": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                        intermediate_size=2560),
        "teacher": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                        intermediate_size=8192),
        "vocab": 49152, "batch": 8, "seq": 1024}
SMOKE = {"student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128),
         "teacher": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=192),
         "vocab": 512, "batch": 2, "seq": 64}


def build(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    common = dict(vocab_size=shape["vocab"], max_position_embeddings=2048, tie_word_embeddings=True,
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU itself: seconds instead of a minute for the 1.7B teacher
        student = LlamaForCausalLM(LlamaConfig(**shape["student"], **common))
        teacher = LlamaForCausalLM(LlamaConfig(**shape["teacher"], **common)).to(torch.bfloat16).eval()
    teacher.requires_grad_(False)
    return student, teacher


def step_fn(row: str, student, teacher, ids, device: str, compiled_loss: bool = False, chunk: int = 2048):
    """`row` is naive, liger, or ours; variants of ours are chosen in run_row. The naive and Liger rows call the
    models as HF's defaults do; ours as the engine does (use_cache=False: no KV cache is kept while training)."""
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    if row == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD
        liger = LigerFusedLinearJSD(jsd_beta=0.0)

    def step():
        with autocast:
            with torch.no_grad():
                h_t = teacher.model(input_ids=ids, **({} if row != "ours" else {"use_cache": False})).last_hidden_state
            if row == "naive":
                s_logits = student(input_ids=ids).logits
                with torch.no_grad():
                    t_logits = teacher.lm_head(h_t)
                V = s_logits.shape[-1]
                loss = F.kl_div(F.log_softmax(s_logits.float().reshape(-1, V), -1),
                                F.log_softmax(t_logits.float().reshape(-1, V), -1), log_target=True,
                                reduction="batchmean")  # mean over tokens
            else:
                h_s = student.model(input_ids=ids, **({} if row != "ours" else {"use_cache": False})).last_hidden_state
                if row == "ours":
                    loss = kd_loss(h_s, student.lm_head.weight, DenseTeacher(h_t, teacher.lm_head.weight),
                                   LossSpec("forward_kl", chunk_tokens=chunk, compile=compiled_loss))
                else:
                    H = h_s.shape[-1]
                    loss = liger(h_s.reshape(-1, H).to(torch.bfloat16), student.lm_head.weight.to(torch.bfloat16),
                                 h_t.reshape(-1, h_t.shape[-1]), teacher.lm_head.weight, None)  # shift_labels
        loss.backward()
        return loss
    return step


def matmul_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - t) / 1e12


ROW_GRAMMAR = "naive, liger or ours[+compile|+cg][+cpp][+ckpt|+ckptN][+chunkN][+budgetNN]"


def parse_row(spec: str) -> tuple[str, bool, bool | int, int, str | None, float | None, bool]:
    row, *opts = spec.split("+")
    compile_, n_ckpt, chunk, mode, budget, cpp = False, 0, 2048, None, None, False
    for o in opts:
        if o == "compile":
            compile_ = True
        elif o == "cg":  # torch.compile's CUDA graphs for the blocks (mode "reduce-overhead")
            compile_, mode = True, "reduce-overhead"
        elif o.startswith("chunk") and o[5:].isdigit():
            chunk = int(o[5:])
        elif o == "ckpt":
            n_ckpt = True
        elif o.startswith("ckpt") and o[4:].isdigit():
            n_ckpt = int(o[4:])
        elif o.startswith("budget") and o[6:].isdigit() and 0 < int(o[6:]) < 100:
            budget = int(o[6:]) / 100
        elif o == "cpp":  # inductor's C++ wrapper: kernels launched from generated C++, not Python
            cpp = True
        else:
            sys.exit(f"bad row '{spec}': expected {ROW_GRAMMAR}")
    if row not in ("naive", "liger", "ours") or (opts and row != "ours") or ((budget or cpp) and not compile_):
        sys.exit(f"bad row '{spec}': expected {ROW_GRAMMAR} (+budget and +cpp need +compile or +cg)")
    return row, compile_, n_ckpt, chunk, mode, budget, cpp


def run_row(spec: str, shape: dict, device: str, steps: int, profile_dir: Path | None = None) -> dict:
    """`spec`: see ROW_GRAMMAR (the engine's switches, distill/layers.py)."""
    row, compile_, n_ckpt, chunk, mode, budget, cpp = parse_row(spec)
    if compile_:  # each row compiles its own graphs: dynamo would reuse an earlier row's (same code objects)
        torch._dynamo.reset()
    import torch._inductor.config as inductor_config
    inductor_config.cpp_wrapper = cpp  # read when a graph compiles (lazily, in the warm-up steps)
    gc.collect()  # the rows before this one are gone (patched forwards make reference cycles)
    if device == "cuda":
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    student, teacher = build(shape, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    step = step_fn(row, student, teacher, ids, device, compiled_loss=compile_, chunk=chunk)
    patch_layers(student, compile=compile_, checkpoint_layers=n_ckpt, compile_mode=mode, memory_budget=budget)
    patch_layers(teacher, compile=compile_, compile_mode=mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    graphs = mode == "reduce-overhead"

    def one():
        if graphs:  # a new iteration: CUDA-graph trees may reuse the last step's static outputs from here on
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = step()
        opt.step()
        return loss

    if device == "cuda":  # before the warm-up: CUDA-graph trees allocate their pools while recording
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    for _ in range(3):  # warm-up: allocator, kernels, compile (CUDA-graph trees: a warm-up run, then recording)
        one()
    sync()
    warm_s = time.perf_counter() - t_warm
    cuda = device == "cuda"
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    host = []
    t = time.perf_counter()
    if cuda:
        marks[0].record()
    for i in range(steps):
        h0 = time.perf_counter()
        loss = one()
        host.append(time.perf_counter() - h0)
        if cuda:
            marks[i + 1].record()
    sync()
    sec = (time.perf_counter() - t) / steps
    step_ms = [round(a.elapsed_time(b), 1) for a, b in zip(marks, marks[1:])]
    tokens = shape["batch"] * shape["seq"]
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    out = {"tok_s": round(tokens / sec, 1), "loss": round(float(loss.detach()), 5),
           "model_tflops": round((6 * n_s + 2 * n_t) * tokens / sec / 1e12, 2), "warmup_s": round(warm_s, 1)}
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None
    out["step_ms"] = step_ms
    out["resident_before_gib"] = None if resident is None else round(resident, 3)  # left over by earlier rows
    # Python's time to issue each step (no sync inside a step): near the GPU step time only when the launch queue is
    # full, i.e. the host is ahead; see the profile for whether the GPU ever waits on it.
    out["host_ms"] = [round(1e3 * h, 1) for h in host]
    if profile_dir is not None:
        out["profile"] = profile_steps(one, spec, profile_dir)
    del student, teacher, opt, step, one
    if compile_:  # frees the compiled graphs and CUDA-graph pools, which would count in the next row's memory
        torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_steps(one, spec: str, out_dir: Path, steps: int = 3) -> dict:
    """Three more steps under torch.profiler: how busy the GPU was (the union of kernel intervals over the span
    from the first kernel to the last), the longest idle gaps, and the kernels that took the time. The top-kernel
    table goes to `out_dir`/profile_<row>.txt; the trace itself is parsed here and deleted (tens of MB)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            one()
        sync()
    name = spec.replace("+", "_")
    trace = out_dir / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    trace.unlink()
    # --smoke on CPU: the same arithmetic over CPU ops (nested ones overlap; only checks the script)
    cats = ("kernel", "gpu_memcpy", "gpu_memset") if cuda else ("cpu_op",)
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                     if e.get("ph") == "X" and e.get("cat") in cats)
    if not kernels:
        return {"error": "no kernel events in the trace"}
    busy, gaps, (cur0, cur1) = 0.0, [], kernels[0][:2]
    for a, b, _ in kernels[1:]:
        if a > cur1:
            busy += cur1 - cur0
            gaps.append(a - cur1)
            cur0, cur1 = a, b
        else:
            cur1 = max(cur1, b)
    busy += cur1 - cur0
    span = kernels[-1][1] - kernels[0][0]
    by_name: dict[str, float] = {}
    for a, b, n in kernels:
        by_name[n] = by_name.get(n, 0.0) + (b - a)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    (out_dir / f"profile_{name}.txt").write_text(
        "\n".join(f"{us / steps / 1e3:9.2f} ms/step  {n[:160]}" for n, us in top) + "\n\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    gaps.sort(reverse=True)
    return {"gpu_busy_fraction": round(busy / span, 3), "span_ms_per_step": round(span / steps / 1e3, 1),
            "busy_ms_per_step": round(busy / steps / 1e3, 1), "kernels_per_step": len(kernels) // steps,
            "idle_gaps_over_50us_ms_per_step": round(sum(g for g in gaps if g > 50) / steps / 1e3, 2),
            "longest_gaps_us": [round(g) for g in gaps[:8]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the JSON here after every row")
    ap.add_argument("--rows", default="naive,liger,ours,ours+compile,ours+cg+budget80+chunk1024,ours+cg+budget50+chunk1024",
                    help="comma-separated: naive | liger | ours[+compile][+ckpt] (ckpt: gradient checkpointing, "
                         "since student activations dominate the peak once the logits are gone)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--profile-rows", default="", help="comma-separated rows to profile for 3 more steps (GPU busy "
                                                      "fraction, idle gaps, top kernels) into --profile-dir")
    ap.add_argument("--profile-dir", default=None, help="where profile_<row>.txt go (default: beside --out)")
    a = ap.parse_args()
    for row in a.rows.split(","):
        parse_row(row)  # a typo costs nothing yet: before the GPU's minutes start counting on model builds
    prof_rows = set(filter(None, a.profile_rows.split(",")))
    prof_dir = Path(a.profile_dir or (Path(a.out).parent if a.out else "."))
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not a.smoke:
        sys.exit("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on CPU)")
    shape = SMOKE if a.smoke else FULL
    peak = matmul_tflops(device)
    res: dict = {"bench": "distill_gpu", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
                 "torch": torch.__version__, "batch": shape["batch"], "seq": shape["seq"], "steps": a.steps,
                 "matmul_bf16_tflops": None if peak is None else round(peak, 1)}
    for row in a.rows.split(","):
        print(f"-- {row}", file=sys.stderr, flush=True)
        if row == "liger" and device == "cpu":
            res[row] = {"skipped": "Liger's kernels are Triton (GPU only)"}
            continue
        try:
            res[row] = run_row(row, shape, device, a.steps, prof_dir if row in prof_rows else None)
        except torch.OutOfMemoryError:
            res[row] = {"oom": True}
        except ImportError as e:
            res[row] = {"skipped": f"{e}"}
        except Exception as e:  # one broken row must not cost the others (a lent GPU's minutes are few)
            res[row] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if peak and "model_tflops" in res[row]:
            res[row]["mfu"] = round(res[row]["model_tflops"] / peak, 3)
        print(f"   {res[row]}", file=sys.stderr, flush=True)
        _ratios(res)
        if a.out:
            tmp = Path(a.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(a.out)
    print(json.dumps(res))


def _ratios(res: dict) -> None:
    naive = res.get("naive", {})
    for row, r in list(res.items()):
        if isinstance(r, dict) and "tok_s" in r and row != "naive" and "tok_s" in naive:
            r["vs_naive_tok_s"] = round(r["tok_s"] / naive["tok_s"], 3)
            if naive.get("peak_gib"):
                r["vs_naive_peak"] = round(r["peak_gib"] / naive["peak_gib"], 3)
            if naive.get("reserved_gib") and r.get("reserved_gib"):
                r["vs_naive_reserved"] = round(r["reserved_gib"] / naive["reserved_gib"], 3)


if __name__ == "__main__":
    main()
