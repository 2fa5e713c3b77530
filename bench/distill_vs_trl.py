"""Our distillation engine vs TRL's GKDTrainer (λ = 0: off-policy, β = 0: forward KL), on CPU.

Same teacher (Llama, 4 layers, hidden 256, vocab 8192), same student (its 2 most important
layers, depth-pruned), same packed text windows, batch, steps, optimizer (AdamW, β2 0.95,
no weight decay, clip 1.0), fp32. Each engine runs in its own process so memory is its own:
peak_mb is the peak resident memory during training above the resident memory just before
the first step (sampled every 10 ms; the larger of the repeats). tok_s is steady state: tokens of
steps 2..N over their time, the best of `--repeats` runs per engine in A-B-B-A order (the machine
may be shared; all runs are listed).
The final held-out KL(teacher ‖ student) of both students is measured by the same code.

    python bench/distill_vs_trl.py [--steps 30 --batch 8 --seq 256]      # last line: one JSON object
Needs `pip install -e .[bench]` (trl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


class PeakRSS:
    """Peak resident memory above a baseline, sampled from /proc (torch's CPU allocator is invisible to tracemalloc)."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def make_models(work: Path, vocab: int) -> None:
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from edgedistill.data.text import load_corpus
    from edgedistill.data.tokens import token_stream
    from edgedistill.distill.prune import block_importance, choose_layers, depth_pruned_copy

    corpus = load_corpus("stdlib", max_chars=1_500_000, seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus.train, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                              show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    teacher = LlamaForCausalLM(cfg)
    with torch.no_grad():  # wider than the default init so the teacher's distribution is far from uniform
        for p in teacher.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.06)
    train = token_stream(hf, corpus.train, max_tokens=400_000)
    held = token_stream(hf, corpus.heldout, max_tokens=8 * 256)
    keep = choose_layers(block_importance(teacher, [train[i * 256:(i + 1) * 256] for i in range(4)]), 2)
    student = depth_pruned_copy(teacher, keep)
    teacher.save_pretrained(work / "teacher")
    student.save_pretrained(work / "student")
    hf.save_pretrained(work / "teacher")
    (work / "data.json").write_text(json.dumps({"train": train, "heldout": held}))


@torch.no_grad()
def heldout_kl(teacher, student, held: list[int], seq: int) -> float:
    wins = torch.tensor([held[i:i + seq] for i in range(0, len(held) - seq + 1, seq)])
    lt = torch.log_softmax(teacher(wins).logits.float(), -1)
    ls = torch.log_softmax(student(wins).logits.float(), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def run_engine(engine: str, work: Path, steps: int, batch: int, seq: int, lr: float, precision: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    data = json.loads((work / "data.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    train = data["train"]
    n_win = len(train) // seq
    wins = [train[i * seq:(i + 1) * seq] for i in range(n_win)]
    with torch.no_grad():  # touch the weights and warm the kernels, so memory measures training alone
        for m in (teacher, student):
            m(torch.tensor(wins[:1]))
    if engine == "ours":
        from edgedistill.distill.losses import LossSpec
        from edgedistill.distill.train import KDConfig, distill
        cfg = KDConfig(steps=steps, batch_size=batch, seq_len=seq, lr=lr, loss=LossSpec("forward_kl", chunk_tokens=512),
                       precision=precision)
        with PeakRSS() as mem:
            m = distill(teacher, student, train, cfg, work / "out-ours")
        secs = sum(m["step_seconds"][1:])
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Times(TrainerCallback):
            marks: list[float] = []

            def on_step_end(self, args, state, control, **kw):
                Times.marks.append(time.perf_counter())

        def collate(rows):
            ids = torch.tensor([r["input_ids"] for r in rows])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        args = GKDConfig(output_dir=str(work / "out-trl"), per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                         adam_beta2=0.95, max_grad_norm=1.0, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                         max_length=seq, bf16=precision == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False,
                         save_strategy="no", report_to=[], logging_steps=10_000, dataloader_num_workers=0,
                         disable_dropout=True, seed=0)
        from transformers import AutoTokenizer
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                             processing_class=AutoTokenizer.from_pretrained(work / "teacher"),
                             train_dataset=Dataset.from_dict({"input_ids": wins}), callbacks=[Times()])
        with PeakRSS() as mem:
            trainer.train()
        secs = Times.marks[-1] - Times.marks[0]
    tok_s = (steps - 1) * batch * seq / secs
    return {"tok_s": round(tok_s, 1), "peak_mb": round(mem.mb, 1),
            "heldout_kl": round(heldout_kl(teacher.cpu(), student.cpu(), data["heldout"], seq), 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                    help="both engines: bf16 autocast (TRL's default, bf16=True; fast on CPUs with AMX) or fp32")
    ap.add_argument("--repeats", type=int, default=2, help="runs per engine (A-B-B-A order); tok_s is the best")
    ap.add_argument("--engine", choices=["ours", "trl"])
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. bench/results/distill_vs_trl.json)")
    ap.add_argument("--work")
    a = ap.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if a.engine:  # child process
        print(json.dumps(run_engine(a.engine, Path(a.work), a.steps, a.batch, a.seq, a.lr, a.precision)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_models(work, a.vocab)
        runs: dict[str, list[dict]] = {"trl": [], "ours": []}
        # A-B-B-A order, best of the repeats: on a shared machine, load drifts between runs.
        order = [e for i in range(a.repeats) for e in (("trl", "ours") if i % 2 == 0 else ("ours", "trl"))]
        for engine in order:
            cmd = [sys.executable, __file__, "--engine", engine, "--work", tmp, "--steps", str(a.steps),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--lr", str(a.lr), "--precision", a.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{engine} failed:\n{out.stderr[-4000:]}")
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, trl = ({"tok_s": max(r["tok_s"] for r in rs), "peak_mb": max(r["peak_mb"] for r in rs),
                  "heldout_kl": rs[0]["heldout_kl"], "all_tok_s": [r["tok_s"] for r in rs]}
                 for rs in (runs["ours"], runs["trl"]))
    result = {
        "bench": "distill_vs_trl", "anchor": "trl GKDTrainer lmbda=0 beta=0 (forward KL)",
        "teacher": "llama 4x256 vocab %d" % a.vocab, "student": "2 layers (depth-pruned)",
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "precision": a.precision, "threads": int(os.environ.get("BENCH_THREADS", "1")),
        "torch": torch.__version__,
        "ours_tok_s": ours["tok_s"], "anchor_tok_s": trl["tok_s"], "ratio_tok_s": round(ours["tok_s"] / trl["tok_s"], 3),
        "ours_peak_mb": ours["peak_mb"], "anchor_peak_mb": trl["peak_mb"],
        "ratio_peak_mb": round(ours["peak_mb"] / trl["peak_mb"], 3),
        "ours_heldout_kl": ours["heldout_kl"], "anchor_heldout_kl": trl["heldout_kl"],
        "repeats": a.repeats, "ours_tok_s_runs": ours["all_tok_s"], "anchor_tok_s_runs": trl["all_tok_s"],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if a.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from edgedistill.artifacts import atomic_write_json
        atomic_write_json(a.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
