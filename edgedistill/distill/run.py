"""The distill stage as one entry: a `distill:` recipe section → data, teacher mode, loop → student folder.

Used by `edgedistill build` (stage_distill) and `edgedistill distill` alike.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..data.batches import Batch, ChatBatches, PromptBatches, TextBatches, next_token_labels
from ..data.tokens import windows
from ..errors import DataError, DistillError
from ..recipe import DistillSpec
from .losses import LossSpec
from .teacher import CachedTeacherBatches, build_teacher_cache, load_teacher, place
from .train import KDConfig, distill, pick_device


def kd_config(d: DistillSpec) -> KDConfig:
    return KDConfig(steps=d.steps, batch_size=d.batch_size, seq_len=d.seq_len, lr=d.lr, warmup_steps=d.warmup_steps,
                    weight_decay=d.weight_decay, grad_clip=d.grad_clip, seed=d.seed,
                    loss=LossSpec(d.loss, d.beta, d.temperature, d.ce_weight, d.chunk_tokens), grad_accum=d.grad_accum,
                    quantize_aware=d.quantize_aware, on_policy_fraction=d.on_policy_fraction,
                    sequence_kd_fraction=d.sequence_kd_fraction, max_new_tokens=d.max_new_tokens,
                    eval_every=d.eval_every, checkpoint_every=d.checkpoint_every, compile=d.compile,
                    gradient_checkpointing=d.gradient_checkpointing, precision=d.precision,
                    cuda_graphs=d.cuda_graphs, memory_budget=d.memory_budget)


def heldout_batches(heldout_windows: list[list[int]], batch_size: int) -> list[Batch]:
    out = []
    for i in range(0, len(heldout_windows), batch_size):
        ids = torch.tensor(heldout_windows[i:i + batch_size])
        ones = torch.ones_like(ids, dtype=torch.bool)
        out.append(Batch(ids, torch.ones_like(ids), ones, next_token_labels(ids, ones)))
    return out


def run_distill(teacher, student, tokenizer, d: DistillSpec, train_stream: list[int] | None, out_dir: Path,
                work_dir: Path, heldout_windows: list[list[int]] | None = None) -> dict:
    """Distill `student` from `teacher` as `d` says; write the student to `out_dir`. `work_dir` keeps the
    offline teacher cache and resumable checkpoints (removed after success)."""
    context = getattr(student.config, "max_position_embeddings", None)
    if context is not None and d.seq_len + (d.max_new_tokens if d.prompts else 0) > context:
        raise DataError(f"distill.seq_len {d.seq_len} is longer than the student's context ({context} tokens); "
                        "lower distill.seq_len.")
    cfg = kd_config(d)
    if d.chat_data:
        data = ChatBatches(d.chat_data, tokenizer, d.seq_len, d.batch_size, d.seed, context=context)
    else:
        if not train_stream:
            raise DataError("no training text: the token stream is empty. Point data.source at text, or give chat_data.")
        data = TextBatches(train_stream, d.seq_len, d.batch_size, seed=d.seed)
    prompts = PromptBatches(d.prompts, tokenizer, d.batch_size, d.seed) if d.prompts else None
    work_dir.mkdir(parents=True, exist_ok=True)
    cache_info = {}
    if d.teacher_mode == "offline":
        if d.chat_data:
            raise DistillError("distill.teacher_mode 'offline' caches packed text windows; use 'online' with chat_data.")
        need = d.steps * d.batch_size * d.grad_accum
        wins = windows(train_stream, d.seq_len, need, what="training data")
        device = pick_device()
        cache_info = build_teacher_cache(place(teacher, device).eval(), wins, d.top_k, work_dir / "teacher_topk.safetensors")
        place(teacher, "cpu")
        data = CachedTeacherBatches(work_dir / "teacher_topk.safetensors", d.batch_size, d.seed)
    heldout = heldout_batches(heldout_windows, d.batch_size) if heldout_windows and d.eval_every else None
    metrics = distill(teacher, student, data, cfg, out_dir, tokenizer=tokenizer, heldout=heldout, prompts=prompts,
                      checkpoint_dir=work_dir if d.checkpoint_every else None)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {**metrics, **({"teacher_cache": {k: v for k, v in cache_info.items() if k != "teacher_cache"}}
                          if cache_info else {})}


def distill_from_paths(teacher: str, student: str, data: str, out_dir: Path, d: DistillSpec,
                       keep_ratio: float = 0.5) -> dict:
    """`edgedistill distill`: resolve models and data from paths, distill, write the student to `out_dir`."""
    from ..artifacts import atomic_dir
    from ..data.text import load_corpus
    from ..data.tokens import token_stream
    from ..models import load_causal_lm, load_tokenizer, resolve_model
    from .prune import block_importance, choose_layers, depth_pruned_copy
    from .train import evaluate_kd

    teacher_dir = resolve_model(teacher)
    t_model = load_teacher(teacher_dir, d.teacher_quant)
    tokenizer = load_tokenizer(teacher_dir)
    stream, held = None, None
    if data.endswith(".jsonl"):
        d = d.model_copy(update={"chat_data": data})
    else:
        corpus = load_corpus(data)
        need = (d.steps * d.batch_size * d.grad_accum + 16) * d.seq_len
        stream = token_stream(tokenizer, corpus.train, max_tokens=need)
        held = windows(token_stream(tokenizer, corpus.heldout, max_tokens=16 * d.seq_len), d.seq_len, 16,
                       what="held-out text")
    if student == "depth_prune":
        calib = windows(stream, d.seq_len, 8, what="calibration text") if stream else \
            [ids for ids, _ in ChatBatches(d.chat_data, tokenizer, d.seq_len, 1).items[:8]]
        imp = block_importance(t_model, calib)
        s_model = depth_pruned_copy(t_model, choose_layers(imp, max(1, int(len(imp) * keep_ratio))))
    else:
        s_model = load_causal_lm(resolve_model(student))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        metrics = run_distill(t_model, s_model, tokenizer, d, stream, tmp, out_dir.with_name(out_dir.name + ".work"),
                              heldout_windows=held)
    if held:
        metrics["final_eval"] = evaluate_kd(t_model, s_model, heldout_batches(held, d.batch_size))
    return metrics
