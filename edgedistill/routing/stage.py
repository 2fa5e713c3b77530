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
from .calibrate import CalibrationItem, fit_escalation, fit_think, pick_escalation_mode
from .generate import Answer, answer_groups
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
    import os

    from ..progress import progress_bar
    from ..serve.engine import BatchEngine
    suite = generate_suite({"calib": spec.calib_size, "test": spec.test_size}, seed=spec.seed)
    calib, test = suite["calib"], suite["test"]
    kind, value = spec.target()
    target = Target(kind=kind, value=value)
    # a multiple of 256, so llama.cpp takes slots × ctx_per_slot as it is (it pads the context otherwise)
    ctx_per_slot = -(-(512 + spec.think_budget + spec.answer_tokens + 64) // 256) * 256
    threads = os.cpu_count() or 1
    n_both = min(spec.think_calib_size, len(calib))
    head, rest = calib[:n_both], calib[n_both:]
    # The teacher answers the calibration head in each mode escalation may use ("auto": thinking only where it
    # measurably pays there, see pick_escalation_mode), then the rest of the calibration split in that mode only.
    teacher_modes = ("on", "off") if spec.teacher_mode == "auto" else (spec.teacher_mode,)
    # Thinking answers are long; direct ones a few tokens. The think threshold needs both modes, but only on the
    # head of the calibration split; the escalation threshold is calibrated on all of it (a wider sample for the
    # rate it must hit), with thinking answers made only where the fitted think policy asks for them.
    total = len(calib) + n_both + 2 * len(test) + len(head) * len(teacher_modes) + 2 * len(rest) + 2 * len(test)
    t0 = time.perf_counter()
    runs: dict[str, list[Answer | None]] = {}

    def ask(engine, *groups):  # several (problems, mode) groups through one queue: the batch stays full
        return answer_groups(engine, tokenizer, groups, think_budget=spec.think_budget,
                             answer_tokens=spec.answer_tokens, on_done=bar.advance)

    with progress_bar("routing: answer the suite (llama.cpp, batched)", total=total) as bar:
        engine = BatchEngine(student_gguf, slots=spec.slots, ctx_per_slot=ctx_per_slot, n_threads=threads,
                             max_queue=total)
        try:
            (runs["student_calib_off"], head_on, runs["student_test_off"], runs["student_test_on"]) = ask(
                engine, (calib, "off"), (head, "on"), (test, "off"), (test, "on"))
            runs["student_calib_on"] = head_on + [None] * len(rest)
            items = [_item(p, runs, i) for i, p in enumerate(calib)]
            policy = fit_think(items, max_acc_loss=spec.think_max_acc_loss, think_budget=spec.think_budget)
            todo = [i for i in range(n_both, len(calib)) if policy.decide_think(calib[i].question).mode == "on"]
            bar.set_total(total - len(rest) + len(todo))
            for i, a in zip(todo, ask(engine, ([calib[i] for i in todo], "on"))[0]):
                runs["student_calib_on"][i] = a
        finally:
            engine.close()
        engine = BatchEngine(teacher_gguf, slots=spec.slots, ctx_per_slot=ctx_per_slot, n_threads=threads,
                             max_queue=total)
        try:
            answers = ask(engine, *[(head, m) for m in teacher_modes], (test, "off"), (test, "on"))
            for m, a in zip(teacher_modes, answers):
                runs[f"teacher_calib_{m}"] = a + [None] * len(rest)
            runs["teacher_test_off"], runs["teacher_test_on"] = answers[-2:]
            escalate_mode, mode_info = pick_escalation_mode(
                {m: [a.correct for a in runs[f"teacher_calib_{m}"][:n_both]] for m in teacher_modes},
                spec.think_max_acc_loss)
            runs[f"teacher_calib_{escalate_mode}"][n_both:] = ask(engine, (rest, escalate_mode))[0]
        finally:
            engine.close()
    calib_acc = {m: _acc([a.correct for a in runs[f"teacher_calib_{m}"][:n_both]]) for m in teacher_modes}
    gen_seconds = time.perf_counter() - t0

    items = [_item(p, runs, i, escalate_mode) for i, p in enumerate(calib)]
    policy = fit_escalation(policy, items, target)
    policy.escalate_think = escalate_mode
    policy.calibration["teacher_calib_acc"] = calib_acc
    if mode_info:
        policy.calibration["escalation_mode"] = mode_info
    policy.save(out_dir / ROUTER_FILE)
    policy = RoutingPolicy.load(out_dir / ROUTER_FILE)  # evaluate exactly what was written

    metrics, rows = evaluate_policy(policy, test, runs, target)
    metrics["escalation_calibration"] = escalation_check(policy, items, rows)
    metrics.update(generation_backend=f"llama.cpp: {Path(student_gguf).name} (student), {Path(teacher_gguf).name} "
                                      f"(adapted teacher); greedy, the serving engine's continuous batching "
                                      f"({spec.slots} slots, {threads} threads)",
                   teacher_mode=escalate_mode, teacher_calib_acc=calib_acc, teacher_mode_choice=mode_info,
                   generation_seconds=round(gen_seconds, 1), calib_size=len(calib), test_size=len(test),
                   think_calib_size=n_both, calib_thinking_answers=n_both + len(todo),
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


def _item(p: Problem, runs: dict, i: int, teacher_mode: str | None = None) -> CalibrationItem:
    off, on = runs["student_calib_off"][i], runs["student_calib_on"][i]
    t = runs[f"teacher_calib_{teacher_mode}"][i] if teacher_mode else None
    return CalibrationItem(p.question, off.correct, off.tokens, off.logprobs,
                           on.correct if on else None, on.tokens if on else None, on.logprobs if on else None,
                           t.correct if t else None, t.tokens if t else None)


def escalation_check(policy: RoutingPolicy, items: list[CalibrationItem], rows: list[dict],
                     rates=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)) -> list[dict]:
    """How well a requested escalation rate carries over: for each rate, the threshold calibrated on the calibration
    split (as the build does for max_escalation_rate) and the rate and routed accuracy it gives on the held-out one."""
    from .calibrate import adaptive_answers, choose_escalation_threshold
    logprobs, sc, st = adaptive_answers(policy, items)
    conf = [policy.confidence(lp) for lp in logprobs]
    tc, tt = [it.teacher_correct for it in items], [it.teacher_tokens for it in items]
    test_conf = np.array([r["confidence"] for r in rows])
    a_c = np.array([r["adaptive_correct"] for r in rows], float)
    t_c = np.array([r["teacher"][0] for r in rows], float)
    out = []
    for rate in rates:
        cut, info = choose_escalation_threshold(conf, sc, tc, st, tt, Target(kind="max_escalation_rate", value=rate))
        esc = test_conf < cut
        out.append({"requested": rate, "calib_rate": round(info["escalation_rate"], 4),
                    "test_rate": round(float(esc.mean()), 4),
                    "test_routed_acc": round(float(np.where(esc, t_c, a_c).mean()), 4)})
    return out


def evaluate_policy(policy: RoutingPolicy, test: list[Problem], runs: dict[str, list[Answer]],
                    target: Target) -> tuple[dict, list[dict]]:
    """Every strategy on the held-out split, from the answers already generated (greedy, so composable)."""
    s_on, s_off = runs["student_test_on"], runs["student_test_off"]
    t_on, t_off = runs["teacher_test_on"], runs["teacher_test_off"]
    t_esc = t_off if policy.escalate_think == "off" else t_on  # the teacher as escalation uses it
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
                     "teacher": [t_esc[i].correct, t_esc[i].tokens, round(t_esc[i].seconds, 3)],
                     "routed_correct": t_esc[i].correct if esc else a.correct,
                     "routed_tokens": a.tokens + (t_esc[i].tokens if esc else 0),
                     "routed_seconds": round(a.seconds + (t_esc[i].seconds if esc else 0.0), 3),
                     "budget_hit": s_on[i].budget_hit, "student_text": a.text[-200:]})

    def col(key, j=None):
        return [r[key][j] if j is not None else r[key] for r in rows]

    m = {
        # teacher_acc: teacher only, in the mode escalation uses (its better one on calibration)
        "teacher_acc": _acc(col("teacher", 0)), "teacher_tokens": _acc(col("teacher", 1)),
        "teacher_acc_think": _acc(col("teacher_on", 0)), "teacher_tokens_think": _acc(col("teacher_on", 1)),
        "teacher_acc_nothink": _acc(col("teacher_off", 0)), "teacher_tokens_nothink": _acc(col("teacher_off", 1)),
        "student_acc_think": _acc(col("student_on", 0)), "student_acc_nothink": _acc(col("student_off", 0)),
        "always_think_acc": _acc(col("student_on", 0)), "always_think_tokens": _acc(col("student_on", 1)),
        "nothink_tokens": _acc(col("student_off", 1)),
        "adaptive_acc": _acc(col("adaptive_correct")), "adaptive_tokens": _acc(col("adaptive_tokens")),
        "think_rate": _acc([r["think"] == "on" for r in rows]),
        "routed_acc": _acc(col("routed_correct")), "routed_tokens": _acc(col("routed_tokens")),
        "escalation_rate": _acc(col("escalated")),
        "budget_hits": int(sum(col("budget_hit"))),
        "latency_s": {"teacher": _acc(col("teacher", 2)), "teacher_think": _acc(col("teacher_on", 2)),
                      "teacher_nothink": _acc(col("teacher_off", 2)), "student_think": _acc(col("student_on", 2)),
                      "student_nothink": _acc(col("student_off", 2)), "routed": _acc(col("routed_seconds"))},
        "policy_overhead_ms_p95": round(float(np.percentile(overhead, 95)) * 1e3, 4) if overhead else 0.0,
        "target": target.model_dump(),
    }
    if target.kind == "max_escalation_rate":
        m["target_escalation_rate"] = target.value
    m["routed_vs_teacher"] = round(m["routed_acc"] / m["teacher_acc"], 4) if m["teacher_acc"] else None
    best = max(m["teacher_acc_think"], m["teacher_acc_nothink"])  # the better mode in hindsight, on this split
    m["routed_vs_best_teacher"] = round(m["routed_acc"] / best, 4) if best else None
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
    t_c, t_t = np.array([r["teacher"][0] for r in rows], float), np.array([r["teacher"][1] for r in rows], float)
    routed = []
    for cut in np.unique(np.concatenate([c, [1.01]])):
        esc = c < cut
        routed.append([round(float((a_t + esc * t_t).mean()), 2), round(float(np.where(esc, t_c, a_c).mean()), 4),
                       round(float(esc.mean()), 4)])
    return {"adaptive": adaptive, "routed": routed}
