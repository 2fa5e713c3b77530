"""Crash-resume of `edgedistill build`: kill -9 during each stage, rerun, and the build resumes from the last
finished stage (nothing finished is recomputed) and ends with the same deterministic outputs as a clean run.
The kill point is the test-only EDGEDISTILL_TEST_PAUSE_STAGE hook (build.py): after a stage wrote its outputs,
before the manifest records it. Also: unwritable and full output folders fail clearly, leaving nothing that
looks complete."""
from __future__ import annotations

import pytest

from edgedistill.build import STAGE_ORDER
from reliability_kit import crash_resume, stage_records, tiny_build_recipe


def test_kill_9_in_every_stage_resumes_and_matches_a_clean_build(tmp_path, tiny_model_dir):
    recipe = tiny_build_recipe(tmp_path / "tiny.yaml", tiny_model_dir, onnx=False)  # ONNX export: bench only (slow)
    report = crash_resume(recipe, tmp_path / "resumed", tmp_path / "clean", STAGE_ORDER)
    assert not report.problems, report.problems
    assert all(report.deterministic_equal.values()), report
    assert set(stage_records(tmp_path / "resumed")) == set(STAGE_ORDER)


def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, tiny_model_dir):
    """A file size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk, root or not) that the
    student_init stage's safetensors file cannot fit in."""
    import resource
    import signal
    import subprocess
    import sys

    from edgedistill.artifacts import Manifest

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    recipe = tiny_build_recipe(tmp_path / "tiny.yaml", tiny_model_dir, onnx=False)
    out = tmp_path / "full"
    r = subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", str(recipe), "--out", str(out)],
                       preexec_fn=small_disk, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stdout, r.stdout[-3000:]
    assert "stage 'student_init' failed: the disk holding" in r.stdout and "is full" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no student_init/, no temporaries
    manifest = Manifest(out)
    done = STAGE_ORDER[:STAGE_ORDER.index("student_init")]
    assert list(manifest.stages) == done and all(manifest.outputs_intact(s) for s in done)


def test_unwritable_output_folder_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    """Root ignores permission bits (and CI runs as root), so there the write is refused by an OSError-injecting
    wrapper around the temp-file calls every atomic write goes through; elsewhere by a real chmod."""
    import errno
    import os
    import tempfile

    from edgedistill.build import run_build
    from edgedistill.errors import EdgeDistillError
    from edgedistill.recipe import load_recipe

    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        for name in ("mkstemp", "mkdtemp"):
            real = getattr(tempfile, name)

            def refuse(*a, _real=real, **kw):
                if str(kw.get("dir", "")).startswith(str(out)):
                    raise PermissionError(errno.EACCES, "Permission denied", str(kw["dir"]))
                return _real(*a, **kw)
            monkeypatch.setattr(tempfile, name, refuse)
    else:
        out.chmod(0o555)
    recipe = load_recipe(tiny_build_recipe(tmp_path / "tiny.yaml", tiny_model_dir, onnx=False))
    with pytest.raises(EdgeDistillError, match="'.*ro' is not writable.*choose another --out"):
        run_build(recipe, out, log=lambda _: None)
    assert list(out.iterdir()) == []
