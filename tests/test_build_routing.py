"""A tiny build with routing on: hybrid teacher and student, router.json, routing metrics in the manifest."""
import json

import pytest

from edgedistill.build import STAGE_ORDER, run_build
from edgedistill.routing.policy import ROUTER_FILE, RoutingPolicy
from test_build import tiny_recipe

ROUTING = {"enabled": True, "train_size": 24, "calib_size": 16, "think_calib_size": 8, "test_size": 12, "teacher_steps": 3,
           "student_steps": 3, "batch_size": 4, "seq_len": 160, "think_budget": 16, "answer_tokens": 6,
           "max_escalation_rate": 0.3}


@pytest.fixture(scope="module")
def routed_build(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("routed")
    recipe = tiny_recipe(tiny_model_dir, routing=ROUTING, distill={"steps": 4}, export={"onnx": False},
                         eval={"decode_tokens": 0})
    manifest = run_build(recipe, out, log=lambda m: None)
    return out, manifest, recipe


def test_routing_build_writes_router_and_metrics(routed_build):
    out, manifest, _ = routed_build
    stages = manifest.stages
    assert list(stages) == STAGE_ORDER or set(stages) == set(STAGE_ORDER)
    assert {o["path"] for o in stages["routing"]["outputs"]} >= {ROUTER_FILE, "routing/pareto.png", "routing/report.md",
                                                                "routing/results.jsonl"}
    policy = RoutingPolicy.load(out)
    assert policy.calibrated and policy.target.kind == "max_escalation_rate" and policy.think.budget == 16
    r = stages["eval"]["metrics"]["routing"]
    for key in ("teacher_acc", "student_acc_think", "student_acc_nothink", "always_think_acc", "always_think_tokens",
                "adaptive_acc", "adaptive_tokens", "routed_acc", "escalation_rate", "target_escalation_rate"):
        assert key in r, key
    assert r["target_escalation_rate"] == 0.3 and 0.0 <= r["escalation_rate"] <= 1.0
    # Escalation goes to the teacher's better mode on calibration, and teacher_acc is that mode's accuracy.
    acc = stages["routing"]["metrics"]["teacher_calib_acc"]
    assert policy.escalate_think == r["teacher_mode"] == max(acc, key=lambda m: (acc[m], m == "off"))
    assert r["teacher_acc"] == r["teacher_acc_think" if r["teacher_mode"] == "on" else "teacher_acc_nothink"]
    # Both modes on the calibration head only; thinking elsewhere only where the policy asks for it.
    rm = stages["routing"]["metrics"]
    assert rm["think_calib_size"] == 8 and 8 <= rm["calib_thinking_answers"] <= 16 and rm["calib_size"] == 16
    check = stages["routing"]["metrics"]["escalation_calibration"]
    assert [c["requested"] for c in check][:2] == [0.05, 0.1]
    assert all(c["calib_rate"] <= c["requested"] + 1e-9 and 0 <= c["test_rate"] <= 1 for c in check)
    # Hybrid training in bf16 where the CPU has it natively.
    from edgedistill.distill.train import native_bf16
    assert stages["hybrid_teacher"]["metrics"]["precision"] == ("bf16" if native_bf16() else "fp32")
    assert 0 < r["always_think_tokens"] <= 16 + 6 and r["test_size"] == 12
    # The exported student is the one trained in both modes.
    assert stages["hybrid_student"]["metrics"]["steps"] == 3 and (out / "student_hybrid").is_dir()
    assert (out / "teacher_hybrid" / "teacher-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    rows = [json.loads(line) for line in (out / "routing" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(row["think"] in ("on", "off") for row in rows)
    assert (out / "routing" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Adaptive thinking and routing" in (out / "report.md").read_text()


def test_changing_the_target_recalibrates_without_retraining(routed_build, tiny_model_dir):
    out, _, _ = routed_build
    logs: list[str] = []
    recipe = tiny_recipe(tiny_model_dir, routing={**ROUTING, "max_escalation_rate": None, "target_accuracy_ratio": 0.9},
                         distill={"steps": 4}, export={"onnx": False}, eval={"decode_tokens": 0})
    manifest = run_build(recipe, out, log=logs.append)
    skipped = {line.split()[1].rstrip(":") for line in logs if "skipped" in line}
    assert {"hybrid_teacher", "distill", "hybrid_student", "export"} <= skipped and "routing" not in skipped
    assert RoutingPolicy.load(out).target.kind == "target_accuracy_ratio"
    assert "target_escalation_rate" not in manifest.stages["eval"]["metrics"]["routing"]
