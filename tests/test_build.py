"""The whole build on a tiny model: every stage real, end to end."""
import json

import pytest
import yaml

from edgedistill.artifacts import sha256_file
from edgedistill.build import STAGE_ORDER, run_build
from edgedistill.recipe import parse_recipe


def tiny_recipe(model_dir, **over):
    data = {"name": "tiny", "teacher": {"model": str(model_dir)},
            "student": {"calib_windows": 2},
            "data": {"max_chars": 150_000},
            "distill": {"steps": 12, "batch_size": 4, "seq_len": 64, "lr": 2e-3, "warmup_steps": 2},
            "eval": {"windows": 4, "seq_len": 64},
            "routing": {"enabled": False}}  # tests/test_build_routing.py builds with it on
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return parse_recipe(data)


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    logs: list[str] = []
    manifest = run_build(tiny_recipe(tiny_model_dir), out, log=logs.append)
    return out, manifest, logs


def test_every_stage_done_and_hashes_match(built):
    out, manifest, _ = built
    data = json.loads((out / "manifest.json").read_text())
    assert set(STAGE_ORDER) <= set(data["stages"])
    assert {"torch", "transformers", "gguf", "onnxruntime", "llama_cpp_python"} <= set(data["versions"])
    assert data["recipe"]["distill"]["steps"] == 12
    for name, rec in data["stages"].items():
        assert rec["status"] == "done" and rec["seconds"] >= 0
        for o in rec["outputs"]:
            f = out / o["path"]
            assert f.is_file() and f.stat().st_size == o["bytes"] and sha256_file(f) == o["sha256"]
    paths = {o["path"] for o in data["stages"]["export"]["outputs"]}
    assert {"export/student-f16.gguf", "export/student-q8_0.gguf", "export/student.onnx"} <= paths
    assert (out / "report.md").is_file() and (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_covers_every_variant(built):
    _, manifest, _ = built
    ev = manifest.stages["eval"]["metrics"]
    for key in ("teacher", "student_init", "student", "compressed", "export/student-f16.gguf",
                "export/student-q8_0.gguf", "export/student.onnx"):
        assert ev["ppl"][key] > 1.0
    # Exported files behave like the torch student they came from.
    assert ev["top1_agreement"]["export/student.onnx"] > 0.99
    assert ev["top1_agreement"]["export/student-f16.gguf"] > 0.95
    assert ev["top1_agreement"]["export/student-q8_0.gguf"] > 0.85
    assert ev["kl_to_reference"]["export/student.onnx"] < 1e-4


def test_rerun_skips_finished_stages_and_redoes_changed_ones(built, tiny_model_dir):
    out, manifest, _ = built
    before = json.loads((out / "manifest.json").read_text())["stages"]
    logs: list[str] = []
    run_build(tiny_recipe(tiny_model_dir), out, log=logs.append)
    assert sum("skipped" in line for line in logs) == len(STAGE_ORDER)
    logs.clear()
    run_build(tiny_recipe(tiny_model_dir, eval={"windows": 3}), out, log=logs.append)
    skipped = {line.split()[1].rstrip(":") for line in logs if "skipped" in line}
    assert {"teacher", "student_init", "distill", "compress", "export"} <= skipped
    assert "eval" not in skipped
    after = json.loads((out / "manifest.json").read_text())["stages"]
    assert after["distill"]["finished_at"] == before["distill"]["finished_at"]


def test_damaged_output_is_rebuilt(built, tiny_model_dir):
    out, _, _ = built
    gguf = out / "export" / "student-f16.gguf"
    gguf.write_bytes(b"garbage")
    logs: list[str] = []
    run_build(tiny_recipe(tiny_model_dir, eval={"windows": 3}), out, log=logs.append)
    assert any("▶ export" in line for line in logs)
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_cli_bad_recipe_fails_before_work(tmp_path):
    import subprocess
    import sys
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"distill": {"steps": -1}}))
    proc = subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", str(p), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "distill.steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_devices_stage_places_the_chosen_file(built):
    out, manifest, _ = built
    dev = manifest.stages["devices"]["metrics"]["host"]
    chosen = dev["choice"]["path"]
    assert chosen in {o["path"] for o in manifest.stages["export"]["outputs"]}
    placed = out / "host" / chosen.split("/")[-1]
    assert placed.is_file() and json.loads((out / "host" / "device.json").read_text())["device"] == "host"
    assert dev["profile"]["memory_bandwidth_gbs"] > 0 and dev["choice"]["decode_tps"] > 0
    ev = manifest.stages["eval"]["metrics"]
    assert set(ev["decode_tps"]) == {"export/student-f16.gguf", "export/student-q8_0.gguf", "export/student.onnx"}
    assert all(v > 0 for v in ev["decode_tps"].values()) and set(ev["gates"].values()) == {"pass"}
    assert "## Target devices" in (out / "report.md").read_text() and "decode tok/s" in (out / "report.md").read_text()


def test_failed_gate_fails_the_build_naming_file_and_figure(built, tiny_model_dir):
    from edgedistill.errors import EvalError
    out, _, _ = built
    with pytest.raises(EvalError, match=r"export/student-q8_0.gguf: KL to student [0-9.]+ \(eval.max_kl 1e-09\)"):
        run_build(tiny_recipe(tiny_model_dir, eval={"windows": 3, "max_kl": 1e-9}), out, log=lambda m: None)
    manifest = run_build(tiny_recipe(tiny_model_dir, eval={"windows": 3, "max_ppl_increase": 0.5}), out,
                         log=lambda m: None)
    assert set(manifest.stages["eval"]["metrics"]["gates"].values()) == {"pass"}


def test_cli_serves_the_build_to_the_openai_client(built):
    """`edgedistill serve OUT_DIR` on a real build folder answers the official client over a socket."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai

    out, _, _ = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "serve", str(out), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120  # gradio import for /ui is the slow part
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Return the sum of a list."}])
        assert isinstance(r.choices[0].message.content, str)
        assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    finally:
        proc.terminate()
        proc.wait(timeout=20)
