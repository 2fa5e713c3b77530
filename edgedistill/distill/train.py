"""The distillation loop: a plain, visible loop (teacher forward, student forward, KD loss, step)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokens import WindowSampler
from ..errors import DistillError
from ..progress import progress_bar
from .losses import forward_kl


@dataclass
class KDConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    temperature: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def lr_at(step: int, cfg: KDConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_vocab(teacher, student) -> None:
    vt = teacher.get_output_embeddings().weight.shape[0]
    vs = student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise DistillError(f"teacher vocabulary ({vt}) differs from student vocabulary ({vs}); cross-tokenizer "
                           "distillation is not supported yet. Use a student that shares the teacher's tokenizer.")


def distill(teacher, student, train_stream: list[int], cfg: KDConfig, out_dir: Path, tokenizer=None) -> dict:
    """Train `student` to match `teacher` by forward KL; save it to `out_dir`; return metrics."""
    check_vocab(teacher, student)
    device = pick_device()
    torch.manual_seed(cfg.seed)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    sampler = WindowSampler(train_stream, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t_head, s_head = teacher.get_output_embeddings(), student.get_output_embeddings()
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    with progress_bar("distill (forward KL)", total=cfg.steps) as bar:
        for step in range(cfg.steps):
            batch = torch.tensor(sampler.next_batch(), device=device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with autocast:
                with torch.no_grad():
                    h_t = teacher.base_model(input_ids=batch).last_hidden_state
                h_s = student.base_model(input_ids=batch).last_hidden_state
                loss = forward_kl(h_s, s_head, h_t, t_head, temperature=cfg.temperature)
            if not torch.isfinite(loss):
                raise DistillError(f"loss became {loss.item()} at step {step}; lower distill.lr (now {cfg.lr}).")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            tokens += batch.numel()
            elapsed = time.perf_counter() - t0
            bar.advance(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
    seconds = time.perf_counter() - t0
    student.eval().to("cpu")
    teacher.to("cpu")
    student.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"device": device.type, "steps": cfg.steps, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_curve": [round(x, 5) for x in losses]}
