"""Fit a RoutingPolicy from the student's (and teacher's) outcomes on the calibration split.

Inputs are plain per-item arrays, so this runs the same on a build's measurements and
on synthetic data in tests:

- difficulty classifier: prompt features → label "the student is wrong without thinking"
  (ThinkSwitcher-style: trained on the student's own outcomes);
- think threshold: the p_hard cut with the fewest generated tokens whose accuracy stays
  within `max_acc_loss` of always-think;
- confidence: logistic regression from log-prob statistics to correctness, then PAV
  isotonic regression of correctness on that raw score;
- escalation mode: the large model thinks on escalation only where thinking measurably pays;
- escalation threshold: for the user's target (one of target_accuracy_ratio,
  max_escalation_rate, token_budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import RoutingError
from .features import prompt_features
from .fit import fit_isotonic, fit_logistic
from .policy import ConfidenceSpec, RoutingPolicy, Target, ThinkSpec

TARGET_KINDS = ("target_accuracy_ratio", "max_escalation_rate", "token_budget")


@dataclass
class CalibrationItem:
    """One calibration problem: the student without thinking, with thinking where it was generated (None
    otherwise: the think threshold is chosen on the items that have both), the escalation model once."""
    prompt: str
    nothink_correct: bool
    nothink_tokens: int
    nothink_logprobs: Sequence[float]
    think_correct: bool | None
    think_tokens: int | None
    think_logprobs: Sequence[float] | None
    teacher_correct: bool | None = None
    teacher_tokens: int | None = None


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Cut points that separate every pair of distinct scores, plus both ends."""
    u = np.unique(scores)
    mids = (u[1:] + u[:-1]) / 2 if len(u) > 1 else np.array([])
    return np.concatenate([[u[0] - 1e-9], mids, [u[-1] + 1e-9]]) if len(u) else np.array([0.0])


def choose_think_threshold(p_hard, think_correct, nothink_correct, think_tokens, nothink_tokens,
                           max_acc_loss: float) -> tuple[float, dict]:
    """The cut on p_hard with the fewest mean tokens whose accuracy is ≥ always-think's − max_acc_loss."""
    p = np.asarray(p_hard, float)
    tc, nc = np.asarray(think_correct, float), np.asarray(nothink_correct, float)
    tt, nt = np.asarray(think_tokens, float), np.asarray(nothink_tokens, float)
    floor = tc.mean() - max_acc_loss
    best = None
    for cut in np.concatenate([_candidates(p), [1.0]]):
        think = p >= cut
        acc = float(np.where(think, tc, nc).mean())
        tokens = float(np.where(think, tt, nt).mean())
        key = (acc < floor - 1e-12, tokens if acc >= floor - 1e-12 else -acc, -acc)
        if best is None or key < best[0]:
            best = (key, float(min(max(cut, 0.0), 1.0)), {"acc": acc, "tokens": tokens, "think_rate": float(think.mean())})
    _, cut, info = best
    info.update(always_think_acc=float(tc.mean()), always_think_tokens=float(tt.mean()))
    return cut, info


def choose_escalation_threshold(confidence, student_correct, teacher_correct, student_tokens, teacher_tokens,
                                target: Target) -> tuple[float, dict]:
    """Escalate when confidence < threshold; pick the threshold that meets `target` with the fewest escalations
    (max_escalation_rate: the most escalations within the cap)."""
    c = np.asarray(confidence, float)
    sc, tc = np.asarray(student_correct, float), np.asarray(teacher_correct, float)
    st, tt = np.asarray(student_tokens, float), np.asarray(teacher_tokens, float)
    rows = []
    for cut in np.concatenate([_candidates(c), [1.01]]):
        esc = c < cut
        rows.append((float(min(max(cut, 0.0), 1.01)), float(esc.mean()), float(np.where(esc, tc, sc).mean()),
                     float((st + esc * tt).mean())))
    rows.sort(key=lambda r: (r[1], r[0]))  # by escalation rate
    teacher_acc = float(tc.mean())
    if target.kind == "max_escalation_rate":
        ok = [r for r in rows if r[1] <= target.value + 1e-12]
        chosen = ok[-1] if ok else rows[0]
    elif target.kind == "target_accuracy_ratio":
        ok = [r for r in rows if r[2] >= target.value * teacher_acc - 1e-12]
        chosen = ok[0] if ok else max(rows, key=lambda r: (r[2], -r[1]))
    else:
        ok = [r for r in rows if r[3] <= target.value + 1e-9]
        chosen = ok[-1] if ok else rows[0]
    cut, rate, acc, tokens = chosen
    return cut, {"escalation_rate": rate, "routed_acc": acc, "mean_tokens": tokens, "teacher_acc": teacher_acc,
                 "target_met": bool(ok), "curve": [{"threshold": round(r[0], 6), "escalation_rate": round(r[1], 4),
                                                    "routed_acc": round(r[2], 4), "mean_tokens": round(r[3], 2)}
                                                   for r in rows[:: max(1, len(rows) // 40)]]}


def fit_think(items: list[CalibrationItem], *, max_acc_loss: float = 0.01, think_budget: int | None = None,
              low_quantile: float = 0.1) -> RoutingPolicy:
    """The policy's first half: the difficulty classifier (on every item's no-think outcome) and the think threshold
    (on the items answered in both modes). The caller then answers, in thinking mode, the items this policy sends to
    thinking that lack a thinking answer, and calls `fit_escalation`."""
    if len(items) < 4:
        raise RoutingError(f"calibration needs at least 4 problems, got {len(items)}; raise routing.calib_size.")
    both = [it for it in items if it.think_correct is not None]
    if len(both) < 4:
        raise RoutingError(f"calibration needs at least 4 problems answered in both modes, got {len(both)}; raise "
                           "routing.think_calib_size.")
    x = np.stack([prompt_features(it.prompt) for it in items])
    clf = fit_logistic(x, np.array([not it.nothink_correct for it in items], float))
    think = ThinkSpec(mean=clf.mean.tolist(), scale=clf.scale.tolist(), weights=clf.weights.tolist(), bias=clf.bias,
                      threshold=0.5, budget=think_budget)
    p_hard = clf.predict(np.stack([prompt_features(it.prompt) for it in both]))
    think_cut, think_info = choose_think_threshold(
        p_hard, [it.think_correct for it in both], [it.nothink_correct for it in both],
        [it.think_tokens for it in both], [it.nothink_tokens for it in both], max_acc_loss)
    think.threshold = think_cut
    think_info.update(n_both_modes=len(both), n_classifier=len(items))
    return RoutingPolicy(calibrated=True, think=think, confidence_map=ConfidenceSpec(low_quantile=low_quantile),
                         calibration={"think": think_info})


def adaptive_answers(policy: RoutingPolicy, items: list[CalibrationItem]) -> tuple[list, np.ndarray, np.ndarray]:
    """Per item, the student's answer in the mode the policy picks: (log-probs, correct, tokens)."""
    chose = [policy.decide_think(it.prompt).mode == "on" for it in items]
    missing = [i for i, (it, t) in enumerate(zip(items, chose)) if t and it.think_correct is None]
    if missing:
        raise RoutingError(f"calibration items {missing[:5]} go to thinking but have no thinking answer.")
    logprobs = [it.think_logprobs if t else it.nothink_logprobs for it, t in zip(items, chose)]
    correct = np.array([it.think_correct if t else it.nothink_correct for it, t in zip(items, chose)], float)
    tokens = np.array([it.think_tokens if t else it.nothink_tokens for it, t in zip(items, chose)], float)
    return logprobs, correct, tokens


def pick_escalation_mode(correct: dict[str, Sequence[bool]], tolerance: float) -> tuple[str, dict]:
    """The large model's think mode on escalation, from its answers to the same calibration problems in each
    mode (`correct`: mode -> per-problem outcome; one mode given: that one).

    Thinking costs the large model an order of magnitude more tokens and latency than a direct answer, so it is
    chosen only when its paired accuracy gain beats `tolerance` (the loss adaptive thinking may accept) by more
    than one standard error of that gain: one problem out of 80 is noise, not a reason to pay 10x."""
    if len(correct) == 1:
        return next(iter(correct)), {}
    on, off = np.asarray(correct["on"], bool), np.asarray(correct["off"], bool)
    if len(on) != len(off) or len(on) == 0:
        raise RoutingError(f"the escalation mode needs answers to the same problems in both modes "
                           f"(got {len(on)} thinking and {len(off)} direct).")
    n = len(on)
    only_on, only_off = int((on & ~off).sum()), int((off & ~on).sum())
    gain = (only_on - only_off) / n
    se = float(np.sqrt(max((only_on + only_off) / n - gain ** 2, 0.0) / n))
    mode = "on" if gain > tolerance + se else "off"
    return mode, {"acc_on": float(on.mean()), "acc_off": float(off.mean()), "only_on": only_on,
                  "only_off": only_off, "gain": round(gain, 4), "gain_se": round(se, 4), "tolerance": tolerance}


def fit_escalation(policy: RoutingPolicy, items: list[CalibrationItem], target: Target | None) -> RoutingPolicy:
    """The second half: the confidence map and the escalation threshold, on the answers the adaptive policy gives
    (what serving will see). Every item the policy sends to thinking must have its thinking answer."""
    low_quantile = policy.confidence_map.low_quantile
    logprobs, correct, tokens = adaptive_answers(policy, items)
    stats = np.stack([policy.logprob_stats(lp) if len(lp) else np.array([-100.0] * 3) for lp in logprobs])
    conf_clf = fit_logistic(stats, correct)
    # Fold the standardisation into the weights so serving needs no feature scaling.
    w = conf_clf.weights / conf_clf.scale
    b = conf_clf.bias - float(conf_clf.mean @ w)
    raw = conf_clf.predict(stats)
    iso = fit_isotonic(raw, correct)
    policy.confidence_map = ConfidenceSpec(low_quantile=low_quantile, weights=w.tolist(), bias=b,
                                           iso_x=iso.xs.tolist(), iso_y=np.clip(iso.ys, 0, 1).tolist())
    conf = np.array([policy.confidence(lp) for lp in logprobs])
    info = {"n": len(items), **policy.calibration, "student_acc_adaptive": float(correct.mean()),
            "isotonic_blocks": len(iso.xs)}
    if target is not None:
        if any(it.teacher_correct is None for it in items):
            raise RoutingError("escalation calibration needs the large model's outcome on every calibration item.")
        cut, esc = choose_escalation_threshold(conf, correct, [it.teacher_correct for it in items], tokens,
                                               [it.teacher_tokens for it in items], target)
        policy.escalation_threshold = cut
        policy.target = target
        info["escalation"] = esc
    else:
        policy.escalation_threshold = 0.0  # no target: never escalate
    policy.calibration = info
    return policy


def calibrate_policy(items: list[CalibrationItem], target: Target | None, *, max_acc_loss: float = 0.01,
                     think_budget: int | None = None, low_quantile: float = 0.1) -> RoutingPolicy:
    """Both halves on items that all have both modes (and the large model's outcome when a target is given)."""
    policy = fit_think(items, max_acc_loss=max_acc_loss, think_budget=think_budget, low_quantile=low_quantile)
    return fit_escalation(policy, items, target)
