"""Does distillation beat plain next-token training? Same student, data, steps, lr: KD vs CE.

The default teacher (SmolLM2-135M-Instruct), its depth-pruned student (the build's student_init),
the standard library text; one copy trained with forward KL to the teacher, one with cross-entropy
on the text (ce_weight = 1). Held-out perplexity and KL to the teacher of both, same windows.

    python bench/kd_vs_ce.py [--steps 200] [--out bench/results/kd_vs_ce.json]   # last line: one JSON object
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgedistill.artifacts import atomic_write_json  # noqa: E402
from edgedistill.data.text import load_corpus  # noqa: E402
from edgedistill.data.tokens import token_stream, windows  # noqa: E402
from edgedistill.distill.losses import LossSpec  # noqa: E402
from edgedistill.distill.prune import block_importance, choose_layers, depth_pruned_copy  # noqa: E402
from edgedistill.distill.run import heldout_batches  # noqa: E402
from edgedistill.distill.train import KDConfig, distill, evaluate_kd  # noqa: E402
from edgedistill.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher_dir = resolve_model("smollm2-135m-instruct")
    teacher, tok = load_causal_lm(teacher_dir), load_tokenizer(teacher_dir)
    corpus = load_corpus("stdlib", max_chars=1_000_000, seed=0)
    stream = token_stream(tok, corpus.train, max_tokens=(a.steps * a.batch + 16) * a.seq)
    held = heldout_batches(windows(token_stream(tok, corpus.heldout, max_tokens=24 * 256), 256, 24), 4)
    calib = windows(stream, a.seq, 8)
    imp = block_importance(teacher, calib)
    init = depth_pruned_copy(teacher, choose_layers(imp, len(imp) // 2))
    res = {"bench": "kd_vs_ce", "teacher": "smollm2-135m-instruct", "student_layers": init.config.num_hidden_layers,
           "loadavg_before": [round(x, 2) for x in os.getloadavg()], "steps": a.steps, "batch": a.batch, "seq": a.seq, "lr": a.lr, "precision": a.precision,
           "init": evaluate_kd(teacher, init, held), "teacher_ppl": evaluate_kd(teacher, teacher, held)["heldout_ppl"]}
    for name, spec in (("kd", LossSpec("forward_kl")), ("ce", LossSpec(ce_weight=1.0))):
        student = copy.deepcopy(init)
        cfg = KDConfig(steps=a.steps, batch_size=a.batch, seq_len=a.seq, lr=a.lr, warmup_steps=10, loss=spec,
                       precision=a.precision)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            distill(teacher, student, stream, cfg, Path(tmp))
        res[name] = {**evaluate_kd(teacher, student, held), "seconds": round(time.perf_counter() - t, 1)}
    res["kd_beats_ce"] = res["kd"]["heldout_ppl"] < res["ce"]["heldout_ppl"]
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if a.out:
        atomic_write_json(a.out, res)
    print(json.dumps(res))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
