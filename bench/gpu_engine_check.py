"""The distillation engine's own loop (distill.train.distill) on whatever device this machine has: eager vs
compiled + partial checkpointing vs compiled + CUDA graphs + a memory budget, with on-policy batches and held-out evaluation, on small random Llama models.

Not a speed benchmark (bench/distill_gpu.py is): it checks that the GPU code paths of the loop run and that
the compiled, checkpointed run follows the eager one (same seed, same data: loss curves within bf16 noise).

    python bench/gpu_engine_check.py [--grad-accum 2] [--runs eager,compile+graphs+budget50] [--steps 12]
    # last line: JSON
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgedistill.data.batches import TextBatches  # noqa: E402
from edgedistill.distill.train import KDConfig, distill  # noqa: E402


def models():
    from transformers import LlamaConfig, LlamaForCausalLM
    common = dict(vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                                           num_key_value_heads=6, intermediate_size=1024, **common))
    student = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=512, **common))
    return teacher, student


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step in every run")
    ap.add_argument("--runs", default="eager,compile+ckpt2,compile+graphs+budget50", help="comma-separated subset; "
                    "eager is always run first (the reference)")
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 8192, (200_000,), generator=g).tolist()
    heldout = [TextBatches(stream[-20_000:], 256, 4, seed=1).next_batch()]
    out = {"bench": "gpu_engine_check", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    known = {"eager": {}, "compile+ckpt2": {"compile": True, "gradient_checkpointing": 2},
             "compile+graphs+budget50": {"compile": True, "cuda_graphs": True, "memory_budget": 0.5}}
    wanted = ["eager"] + [r for r in a.runs.split(",") if r and r != "eager"]
    if any(r not in known for r in wanted):
        sys.exit(f"--runs: expected a subset of {sorted(known)}")
    runs = [(r, known[r]) for r in wanted]
    out["grad_accum"] = a.grad_accum
    for name, extra in runs:
        torch._dynamo.reset()  # each run compiles (and records) its own graphs
        teacher, student = models()
        cfg = KDConfig(steps=a.steps, batch_size=8, seq_len=256, lr=1e-3, on_policy_fraction=0.25, max_new_tokens=32,
                       eval_every=a.steps // 2, seed=0, grad_accum=a.grad_accum, **extra)
        with tempfile.TemporaryDirectory() as d:
            m = distill(teacher, student, stream[:-20_000], cfg, Path(d) / "s", heldout=heldout)
        out[name] = {k: m[k] for k in ("precision", "compiled", "cuda_graphs", "memory_budget", "checkpointed_blocks",
                                       "tokens_per_s", "loss_curve")}
        out[name]["evals"] = m["evals"]
        print(name, out[name], file=sys.stderr, flush=True)
    a = out["eager"]["loss_curve"]
    for name, _ in runs[1:]:
        b = out[name]["loss_curve"]
        out[f"max_rel_loss_diff_{name}"] = round(max(abs(x - y) / abs(x) for x, y in zip(a, b)), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
