"""The routing policy: PAV / logistic fits, threshold calibration to a target, router.json round trip and errors."""
import json

import numpy as np
import pytest

from edgedistill.errors import RoutingError
from edgedistill.routing.calibrate import (CalibrationItem, calibrate_policy, choose_escalation_threshold,
                                           choose_think_threshold, fit_escalation, fit_think)
from edgedistill.routing.features import FEATURE_NAMES, prompt_features
from edgedistill.routing.fit import fit_isotonic, fit_logistic, sigmoid
from edgedistill.routing.policy import ROUTER_FILE, RoutingPolicy, Target


def test_pav_pools_violators_exactly():
    iso = fit_isotonic([0, 1, 2, 3, 4], [1, 0, 1, 0, 1])
    assert iso.xs.tolist() == [1.5, 4.0] and iso.ys.tolist() == [0.5, 1.0]
    assert iso.predict([0, 1.5, 2.75, 4, 9]).tolist() == [0.5, 0.5, 0.75, 1.0, 1.0]


def test_pav_is_monotone_keeps_the_mean_and_pools_equal_x():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500).round(1)  # many equal x
    y = (rng.random(500) < sigmoid(2 * x)).astype(float)
    iso = fit_isotonic(x, y)
    assert np.all(np.diff(iso.xs) > 0) and np.all(np.diff(iso.ys) > 0)
    fitted = iso.predict(np.sort(x))
    assert np.all(np.diff(fitted) >= 0)
    # Each block's value is its mean label, so the fitted values at the block centres sum like the labels.
    assert abs(np.interp(np.unique(x), iso.xs, iso.ys).min() - iso.ys[0]) < 1e-12
    # Calibrated: where the truth is sigmoid(2x), the map is close to it in the bulk.
    for q in (-0.5, 0.0, 0.5):
        assert abs(iso.predict(q) - sigmoid(2 * q)) < 0.15


def test_pav_beats_any_other_monotone_fit_in_squared_error():
    rng = np.random.default_rng(1)
    x = np.arange(40.0)
    y = rng.random(40) + x / 40
    iso = fit_isotonic(x, y)
    fitted = iso.fitted
    assert np.all(np.diff(fitted) >= 0) and fitted.sum() == pytest.approx(y.sum())
    best = ((fitted - y) ** 2).sum()
    for _ in range(50):  # perturbed monotone fits are never better
        other = np.maximum.accumulate(fitted + rng.normal(scale=0.05, size=40))
        assert ((other - y) ** 2).sum() >= best - 1e-9


def test_logistic_recovers_direction_and_survives_one_class():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3))
    y = (rng.random(400) < sigmoid(3 * x[:, 0] - 2 * x[:, 2])).astype(float)
    m = fit_logistic(x, y)
    assert m.weights[0] > 1 and m.weights[2] < -0.5 and abs(m.weights[1]) < 0.5
    flat = fit_logistic(x, np.ones(400))
    assert np.all(np.isfinite(flat.weights)) and flat.predict(x).min() > 0.9


def _synthetic(n, seed):
    """Confidence scores with P(student correct) = score; the teacher is right 80% of the time."""
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    student = rng.random(n) < conf
    teacher = rng.random(n) < 0.8
    return conf, student, teacher, np.full(n, 10.0), np.full(n, 50.0)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4])
def test_escalation_threshold_hits_a_target_rate_on_fresh_data(rate):
    conf, s, t, st, tt = _synthetic(1000, 3)
    cut, info = choose_escalation_threshold(conf, s, t, st, tt, Target(kind="max_escalation_rate", value=rate))
    assert info["escalation_rate"] <= rate and info["escalation_rate"] > rate - 0.01
    fresh = _synthetic(2000, 4)[0]
    assert abs((fresh < cut).mean() - rate) < 0.05


def test_escalation_threshold_for_accuracy_ratio_and_token_budget():
    conf, s, t, st, tt = _synthetic(1000, 5)
    cut, info = choose_escalation_threshold(conf, s, t, st, tt, Target(kind="target_accuracy_ratio", value=0.95))
    assert info["target_met"] and info["routed_acc"] >= 0.95 * t.mean()
    esc = conf < cut
    assert np.where(esc, t, s).mean() == pytest.approx(info["routed_acc"])
    # One escalation fewer would miss the target: the fewest escalations were chosen.
    lower = conf < np.sort(conf)[max(0, esc.sum() - 1)]
    assert np.where(lower, t, s).mean() < 0.95 * t.mean()
    cut, info = choose_escalation_threshold(conf, s, t, st, tt, Target(kind="token_budget", value=20.0))
    assert info["mean_tokens"] <= 20.0 and abs(info["escalation_rate"] - 0.2) < 0.01


def test_think_threshold_saves_tokens_within_the_accuracy_floor():
    rng = np.random.default_rng(6)
    p_hard = rng.random(600)
    nothink = rng.random(600) > p_hard       # hard items fail without thinking
    think = rng.random(600) < 0.9            # thinking mostly works
    cut, info = choose_think_threshold(p_hard, think, nothink, np.full(600, 80), np.full(600, 5), 0.01)
    assert 0 < cut < 1 and info["acc"] >= info["always_think_acc"] - 0.01
    assert info["tokens"] < info["always_think_tokens"]


def _items(n=300, seed=7):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        hard = rng.random() < 0.5
        k = int(rng.integers(5, 9)) if hard else int(rng.integers(1, 3))
        prompt = " ".join(f"Add {rng.integers(10, 999)} apples, then each gets more." for _ in range(k))
        nothink_ok = rng.random() < (0.2 if hard else 0.9)
        think_ok = rng.random() < 0.8
        lp = lambda ok: list(rng.normal(-0.1 if ok else -1.5, 0.3, size=6).clip(max=0))
        items.append(CalibrationItem(prompt, nothink_ok, 4, lp(nothink_ok), think_ok, 60, lp(think_ok),
                                     rng.random() < 0.85, 60))
    return items


def test_calibrated_policy_thinks_on_hard_prompts_and_escalates_unsure_answers(tmp_path):
    policy = calibrate_policy(_items(), Target(kind="max_escalation_rate", value=0.25), think_budget=128)
    hard = " ".join(f"Add {n} apples, then each gets more." for n in range(100, 108))
    easy = "Add 12 apples."
    assert policy.decide_think(hard).mode == "on" and policy.decide_think(hard).budget == 128
    d = policy.decide_think(easy)
    assert d.mode == "off" and d.budget is None and d.p_hard < policy.think.threshold and "answer directly" in d.reason
    assert policy.confidence([-0.05] * 6) > 0.7 > 0.3 > policy.confidence([-1.5] * 6)
    assert policy.should_escalate(policy.confidence([-1.5] * 6)) and not policy.should_escalate(policy.confidence([0.0] * 6))
    assert policy.calibration["escalation"]["escalation_rate"] <= 0.25
    # Monotone in every log-prob statistic.
    confs = [policy.confidence([m] * 6) for m in np.linspace(-3, 0, 31)]
    assert all(b >= a for a, b in zip(confs, confs[1:]))
    policy.save(tmp_path)
    back = RoutingPolicy.load(tmp_path / ROUTER_FILE)
    assert back == policy and back.to_dict()["target"] == {"kind": "max_escalation_rate", "value": 0.25}
    assert back.decide_think(hard) == policy.decide_think(hard)


def test_two_phase_calibration_thinks_only_where_the_policy_asks():
    """The build answers only a head of the calibration split in both modes: the think threshold comes from it,
    the escalation threshold from every item (thinking answers only where the fitted policy thinks)."""
    import dataclasses
    full = _items(400)
    head = full[:200]
    rest = [dataclasses.replace(it, think_correct=None, think_tokens=None, think_logprobs=None) for it in full[200:]]
    policy = fit_think(head + rest, think_budget=64)
    assert policy.calibration["think"]["n_both_modes"] == 200 and policy.calibration["think"]["n_classifier"] == 400
    target = Target(kind="max_escalation_rate", value=0.2)
    # An item sent to thinking without its thinking answer cannot be calibrated on: a clear error.
    with pytest.raises(RoutingError, match="no thinking answer"):
        fit_escalation(policy.model_copy(deep=True), head + rest, target)
    filled = [full[200 + i] if policy.decide_think(it.prompt).mode == "on" else it for i, it in enumerate(rest)]
    assert 0 < sum(it.think_correct is not None for it in filled) < len(filled)
    policy = fit_escalation(policy, head + filled, target)
    esc = policy.calibration["escalation"]
    assert esc["escalation_rate"] <= 0.2 and policy.calibration["n"] == 400 and "think" in policy.calibration
    assert policy.decide_think(" ".join(f"Add {n} apples, then each gets more." for n in range(100, 108))).mode == "on"


def test_default_policy_is_documented_behaviour():
    p = RoutingPolicy.default()
    d = p.decide_think("What is 17 * 23 + 4?")
    assert d.mode == "off" and "uncalibrated" in d.reason and not p.calibrated
    assert p.confidence([]) == 0.0 and p.should_escalate(p.confidence([]))
    assert not p.should_escalate(p.confidence([-0.1, -0.2])) and p.should_escalate(p.confidence([-2.0, -1.0]))
    assert p.to_dict()["escalation_threshold"] == 0.5


def test_features_are_named_and_cheap():
    f = prompt_features("Sort the list 3, 10, 7 in ascending order. If Ann is taller than Bo, who is shorter?")
    assert f.shape == (len(FEATURE_NAMES),)
    named = dict(zip(FEATURE_NAMES, f))
    assert named["numbers"] == 3 and named["lists"] >= 3 and named["logic"] >= 3 and named["max_digits"] == 2


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(escalation_threshold="high"), "field 'escalation_threshold'"),
    (lambda d: d["think"].update(weights=[1.0]), "think.weights has 1 values"),
    (lambda d: d["think"].update(features=["x"]), "rebuild the router"),
    (lambda d: d["confidence_map"].update(iso_y=[0.9, 0.1]), "must not decrease"),
    (lambda d: d.update(surprise=1), "field 'surprise': unknown field"),
    (lambda d: d.update(target={"kind": "fastest", "value": 1}), "field 'target.kind'"),
])
def test_bad_router_file_names_the_field(tmp_path, mutate, words):
    data = RoutingPolicy.default().model_dump(mode="json")
    mutate(data)
    f = tmp_path / ROUTER_FILE
    f.write_text(json.dumps(data))
    with pytest.raises(RoutingError, match="router file") as e:
        RoutingPolicy.load(f)
    assert words in str(e.value)


def test_unreadable_or_missing_router_file(tmp_path):
    with pytest.raises(RoutingError, match="does not exist"):
        RoutingPolicy.load(tmp_path / ROUTER_FILE)
    (tmp_path / ROUTER_FILE).write_text("{not json")
    with pytest.raises(RoutingError, match="not valid JSON"):
        RoutingPolicy.load(tmp_path)
    (tmp_path / ROUTER_FILE).write_text("[1, 2]")
    with pytest.raises(RoutingError, match="JSON object"):
        RoutingPolicy.load(tmp_path)


@pytest.mark.parametrize("routing, words", [
    ({"calib_sz": 5}, "routing.calib_sz': unknown key"),
    ({"max_escalation_rate": 1.5}, "routing.max_escalation_rate"),
    ({"target_accuracy_ratio": 0.9, "token_budget": 40}, "give exactly one target"),
    ({"think_budget": 0}, "routing.think_budget"),
])
def test_routing_recipe_section_is_validated(routing, words):
    from edgedistill.errors import RecipeError
    from edgedistill.recipe import parse_recipe
    with pytest.raises(RecipeError) as e:
        parse_recipe({"routing": routing})
    assert words in str(e.value) and len(str(e.value).strip().splitlines()) == 2


def test_routing_recipe_defaults_and_quick():
    from edgedistill.recipe import Recipe
    r = Recipe()
    # on by default (issue #5: the default build adapts teacher and student), with the default target
    assert r.routing.enabled and r.routing.target() == ("max_escalation_rate", 0.25)
    assert not Recipe.model_validate({"routing": {"enabled": False}}).routing.enabled
    assert r.routing.think_calib_size < r.routing.calib_size and r.routing.teacher_mode == "auto"
    q = r.quick()
    assert q.routing.teacher_steps <= r.routing.teacher_steps and q.routing.test_size <= r.routing.test_size
    assert q.routing.think_calib_size <= q.routing.calib_size
    assert Recipe.model_validate({"routing": {"token_budget": 30}}).routing.target() == ("token_budget", 30.0)


def test_escalation_mode_thinks_only_when_the_gain_is_beyond_noise():
    from edgedistill.routing.calibrate import pick_escalation_mode
    off = [True] * 15 + [False] * 65
    one_more = [True] * 16 + [False] * 64  # thinking right on one more problem of 80: noise
    mode, info = pick_escalation_mode({"on": one_more, "off": off}, tolerance=0.01)
    assert mode == "off" and (info["only_on"], info["only_off"], info["gain"]) == (1, 0, 0.0125)
    many_more = [True] * 35 + [False] * 45  # 20 more right, none lost: a real gain
    mode, info = pick_escalation_mode({"on": many_more, "off": off}, tolerance=0.01)
    assert mode == "on" and info["gain"] == 0.25 and 0 < info["gain_se"] < 0.25
    assert pick_escalation_mode({"on": off}, 0.01) == ("on", {})  # a fixed mode stays fixed
    with pytest.raises(RoutingError, match="same problems"):
        pick_escalation_mode({"on": off, "off": off[:10]}, 0.01)
