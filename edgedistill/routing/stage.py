"""The build's routing work, as three entries the build stages call.

- `adapt_teacher`: full fine-tune of the teacher on the suite's hybrid samples (a thinking
  and a direct sample per training problem: CE on the gold text, plus KL to the original
  teacher so it stays close to itself), exported to GGUF for evaluation and serving.
- `distill_hybrid`: the distilled student trained in both modes on the same samples:
  logit KD from the adapted teacher over the gold traces plus CE on them (sequence-level KD
  on gold traces; `sequence_kd_fraction` adds batches of the teacher's own traces).
  Both go through `edgedistill.distill.train.distill`, the one training loop.
- `calibrate_and_evaluate`: the exported student (and the adapted teacher) answer the
  calibration split in both modes; the policy is fitted and saved as router.json; then the
  held-out split is answered and every strategy is scored.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_json, atomic_write_text
from ..data.tasks import Problem, generate_suite, render_prompt
from ..recipe import RoutingSpec
from .calibrate import CalibrationItem, calibrate_policy
from .generate import Answer, answer
from .policy import ROUTER_FILE, RoutingPolicy, Target


def write_hybrid_data(spec: RoutingSpec, tokenizer, work: Path) -> tuple[Path, Path]:
    """Chat JSONL (both modes of every training problem) and prompt JSONL (for sequence-level KD)."""
    train = generate_suite({"train": spec.train_size}, seed=spec.seed)["train"]
    work.mkdir(parents=True, exist_ok=True)
    chat, prompts = work / "hybrid_chat.jsonl", work / "hybrid_prompts.jsonl"
    atomic_write_text(chat, "".join(json.dumps(p.chat(m)) + "\n" for p in train for m in ("on", "off")))
    atomic_write_text(prompts, "".join(json.dumps({"prompt": render_prompt(tokenizer, p.question, m)}) + "\n"
                                       for p in train for m in ("on", "off")))
    return chat, prompts


def _config(spec: RoutingSpec, steps: int, lr: float, ce_weight: float, precision: str, **extra):
    from ..distill.losses import LossSpec
    from ..distill.train import KDConfig
    return KDConfig(steps=steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=lr,
                    warmup_steps=min(5, steps // 5), seed=spec.seed, precision=precision,
                    loss=LossSpec("forward_kl", ce_weight=ce_weight), **extra)


def _summary(m: dict) -> dict:
    keep = ("steps", "tokens", "seconds", "tokens_per_s", "loss_first", "loss_last", "precision")
    return {k: m[k] for k in keep if k in m}


def adapt_teacher(teacher_dir: str, tokenizer, spec: RoutingSpec, precision: str, out_dir: Path, work: Path) -> dict:
    from ..data.batches import ChatBatches
    from ..distill.train import distill
    from ..export.gguf import write_gguf
    from ..models import load_causal_lm
    chat, _ = write_hybrid_data(spec, tokenizer, work)
    original, model = load_causal_lm(teacher_dir), load_causal_lm(teacher_dir)
    data = ChatBatches(chat, tokenizer, spec.seq_len, spec.batch_size, spec.seed,
                       context=getattr(model.config, "max_position_embeddings", None))
    m = distill(original, model, data, _config(spec, spec.teacher_steps, spec.teacher_lr, spec.teacher_ce_weight,
                                               precision), out_dir, tokenizer)
    info = write_gguf(out_dir, out_dir / "teacher-q8_0.gguf", dtype="q8_0")
    return {**_summary(m), "samples": 2 * spec.train_size, "gguf_bytes": info.get("bytes")}


def distill_hybrid(student_dir: Path, teacher_dir: Path, tokenizer, spec: RoutingSpec, precision: str,
                   quantize_aware: str | None, out_dir: Path, work: Path) -> dict:
    from ..data.batches import ChatBatches, PromptBatches
    from ..distill.train import distill
    from ..models import load_causal_lm
    chat, prompts = write_hybrid_data(spec, tokenizer, work)
    teacher, student = load_causal_lm(str(teacher_dir)), load_causal_lm(str(student_dir))
    data = ChatBatches(chat, tokenizer, spec.seq_len, spec.batch_size, spec.seed,
                       context=getattr(student.config, "max_position_embeddings", None))
    cfg = _config(spec, spec.student_steps, spec.student_lr, spec.student_ce_weight, precision,
                  sequence_kd_fraction=spec.sequence_kd_fraction, max_new_tokens=spec.think_budget + spec.answer_tokens,
                  quantize_aware=quantize_aware)
    prompt_batches = PromptBatches(prompts, tokenizer, spec.batch_size, spec.seed) if spec.sequence_kd_fraction else None
    m = distill(teacher, student, data, cfg, out_dir, tokenizer, prompts=prompt_batches)
    return {**_summary(m), "samples": 2 * spec.train_size, "traces": "gold" if not spec.sequence_kd_fraction else
            f"gold + teacher-generated ({spec.sequence_kd_fraction:.0%} of batches)"}


# ------------------------------------------------------------------ calibration and evaluation
def _acc(xs) -> float:
    return round(float(np.mean(xs)), 4) if len(xs) else 0.0


def calibrate_and_evaluate(student_gguf: Path, teacher_gguf: Path, tokenizer, spec: RoutingSpec, out_dir: Path,
                           log=lambda msg: None) -> tuple[dict, list[Path]]:
    """Write `out_dir/router.json` and `out_dir/routing/` (per-problem results, report table, Pareto PNG)."""
    from ..export.llamacpp import LlamaCppModel
    from ..progress import progress_bar
    suite = generate_suite({"calib": spec.calib_size, "test": spec.test_size}, seed=spec.seed)
    kind, value = spec.target()
    target = Target(kind=kind, value=value)
    n_ctx = 512 + spec.think_budget + spec.answer_tokens + 64
    t0 = time.perf_counter()
    runs: dict[str, list[Answer]] = {}
    need_teacher_calib = kind != "max_escalation_rate"
    jobs = [("student", "calib", "off"), ("student", "calib", "on"), ("student", "test", "off"), ("student", "test", "on"),
            ("teacher", "test", "off"), ("teacher", "test", "on")] + \
        ([("teacher", "calib", "on")] if need_teacher_calib else [])
    total = sum(len(suite[split]) for _, split, _ in jobs)
    with progress_bar("routing: answer the suite (llama.cpp)", total=total) as bar:
        for who in ("student", "teacher"):
            with LlamaCppModel(student_gguf if who == "student" else teacher_gguf, n_ctx=n_ctx) as model:
                for w, split, mode in jobs:
                    if w != who:
                        continue
                    out = []
                    for p in suite[split]:
                        out.append(answer(model, tokenizer, p, mode, think_budget=spec.think_budget,
                                          answer_tokens=spec.answer_tokens))
                        bar.advance()
                    runs[f"{who}_{split}_{mode}"] = out
    gen_seconds = time.perf_counter() - t0

    calib = suite["calib"]
    items = []
    for i, p in enumerate(calib):
        on, off = runs["student_calib_on"][i], runs["student_calib_off"][i]
        t = runs["teacher_calib_on"][i] if need_teacher_calib else None
        items.append(CalibrationItem(p.question, off.correct, off.tokens, off.logprobs, on.correct, on.tokens,
                                     on.logprobs, bool(t and t.correct), t.tokens if t else 0))
    policy = calibrate_policy(items, target, max_acc_loss=spec.think_max_acc_loss, think_budget=spec.think_budget)
    if not need_teacher_calib:
        policy.calibration.get("escalation", {}).pop("curve", None)  # routed accuracy there assumed a wrong teacher
        for k in ("routed_acc", "teacher_acc", "target_met"):
            policy.calibration.get("escalation", {}).pop(k, None)
    policy.save(out_dir / ROUTER_FILE)
    policy = RoutingPolicy.load(out_dir / ROUTER_FILE)  # evaluate exactly what was written

    metrics, rows = evaluate_policy(policy, suite["test"], runs, target)
    metrics.update(generation_backend=f"llama.cpp: {Path(student_gguf).name} (student), {Path(teacher_gguf).name} "
                                      "(adapted teacher); greedy, one sequence at a time, shared prefix reused",
                   generation_seconds=round(gen_seconds, 1), calib_size=len(calib), test_size=len(suite["test"]),
                   think_threshold=round(policy.think.threshold, 4),
                   escalation_threshold=round(policy.escalation_threshold, 4),
                   calib_escalation_rate=policy.calibration.get("escalation", {}).get("escalation_rate"))
    rdir = out_dir / "routing"
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rdir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(rdir / "metrics.json", metrics)
    from .report import write_routing_report
    outputs = [out_dir / ROUTER_FILE, rdir / "results.jsonl", rdir / "metrics.json"]
    outputs += write_routing_report(rdir, metrics, rows)
    return metrics, outputs


def evaluate_policy(policy: RoutingPolicy, test: list[Problem], runs: dict[str, list[Answer]],
                    target: Target) -> tuple[dict, list[dict]]:
    """Every strategy on the held-out split, from the answers already generated (greedy, so composable)."""
    s_on, s_off = runs["student_test_on"], runs["student_test_off"]
    t_on, t_off = runs["teacher_test_on"], runs["teacher_test_off"]
    rows, overhead = [], []
    for i, p in enumerate(test):
        t0 = time.perf_counter()
        d = policy.decide_think(p.question)
        a = s_on[i] if d.mode == "on" else s_off[i]
        conf = policy.confidence(a.logprobs)
        esc = policy.should_escalate(conf)
        overhead.append(time.perf_counter() - t0)
        rows.append({"id": p.id, "kind": p.kind, "difficulty": p.difficulty, "answer": p.answer,
                     "p_hard": round(d.p_hard, 4), "think": d.mode, "confidence": round(conf, 4), "escalated": esc,
                     "student_on": [s_on[i].correct, s_on[i].tokens, round(s_on[i].seconds, 3)],
                     "student_off": [s_off[i].correct, s_off[i].tokens, round(s_off[i].seconds, 3)],
                     "teacher_on": [t_on[i].correct, t_on[i].tokens, round(t_on[i].seconds, 3)],
                     "teacher_off": [t_off[i].correct, t_off[i].tokens, round(t_off[i].seconds, 3)],
                     "adaptive_correct": a.correct, "adaptive_tokens": a.tokens,
                     "routed_correct": t_on[i].correct if esc else a.correct,
                     "routed_tokens": a.tokens + (t_on[i].tokens if esc else 0),
                     "routed_seconds": round(a.seconds + (t_on[i].seconds if esc else 0.0), 3),
                     "budget_hit": s_on[i].budget_hit, "student_text": a.text[-200:]})

    def col(key, j=None):
        return [r[key][j] if j is not None else r[key] for r in rows]

    m = {
        "teacher_acc": _acc(col("teacher_on", 0)), "teacher_acc_nothink": _acc(col("teacher_off", 0)),
        "teacher_tokens": _acc(col("teacher_on", 1)),
        "student_acc_think": _acc(col("student_on", 0)), "student_acc_nothink": _acc(col("student_off", 0)),
        "always_think_acc": _acc(col("student_on", 0)), "always_think_tokens": _acc(col("student_on", 1)),
        "nothink_tokens": _acc(col("student_off", 1)),
        "adaptive_acc": _acc(col("adaptive_correct")), "adaptive_tokens": _acc(col("adaptive_tokens")),
        "think_rate": _acc([r["think"] == "on" for r in rows]),
        "routed_acc": _acc(col("routed_correct")), "routed_tokens": _acc(col("routed_tokens")),
        "escalation_rate": _acc(col("escalated")),
        "budget_hits": int(sum(col("budget_hit"))),
        "latency_s": {"teacher": _acc(col("teacher_on", 2)), "student_think": _acc(col("student_on", 2)),
                      "student_nothink": _acc(col("student_off", 2)), "routed": _acc(col("routed_seconds"))},
        "policy_overhead_ms_p95": round(float(np.percentile(overhead, 95)) * 1e3, 4) if overhead else 0.0,
        "target": target.model_dump(),
    }
    if target.kind == "max_escalation_rate":
        m["target_escalation_rate"] = target.value
    m["routed_vs_teacher"] = round(m["routed_acc"] / m["teacher_acc"], 4) if m["teacher_acc"] else None
    m["adaptive_token_saving"] = round(1 - m["adaptive_tokens"] / m["always_think_tokens"], 4) \
        if m["always_think_tokens"] else None
    m["by_difficulty"] = {
        str(d): {k: _acc([r[k][0] if isinstance(r[k], list) else r[k] for r in rows if r["difficulty"] == d])
                 for k in ("teacher_on", "teacher_off", "student_on", "student_off", "adaptive_correct", "routed_correct")}
        for d in sorted({r["difficulty"] for r in rows})}
    m["curves"] = _curves(rows)
    return m, rows


def _curves(rows: list[dict]) -> dict:
    """Accuracy vs mean generated tokens as the think cut (adaptive) and the escalation cut (routed) sweep."""
    p = np.array([r["p_hard"] for r in rows])
    on_c, off_c = np.array([r["student_on"][0] for r in rows], float), np.array([r["student_off"][0] for r in rows], float)
    on_t, off_t = np.array([r["student_on"][1] for r in rows], float), np.array([r["student_off"][1] for r in rows], float)
    adaptive = []
    for cut in np.unique(np.concatenate([p, [1.01]])):
        think = p >= cut
        adaptive.append([round(float(np.where(think, on_t, off_t).mean()), 2),
                         round(float(np.where(think, on_c, off_c).mean()), 4)])
    c = np.array([r["confidence"] for r in rows])
    a_c, a_t = np.array([r["adaptive_correct"] for r in rows], float), np.array([r["adaptive_tokens"] for r in rows], float)
    t_c, t_t = np.array([r["teacher_on"][0] for r in rows], float), np.array([r["teacher_on"][1] for r in rows], float)
    routed = []
    for cut in np.unique(np.concatenate([c, [1.01]])):
        esc = c < cut
        routed.append([round(float((a_t + esc * t_t).mean()), 2), round(float(np.where(esc, t_c, a_c).mean()), 4),
                       round(float(esc.mean()), 4)])
    return {"adaptive": adaptive, "routed": routed}
