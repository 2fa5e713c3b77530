"""`edgedistill build`: the stages wired through the artifact contract.

Each stage is a small recipe over components: it reads what earlier stages
wrote (via the manifest), writes its own folder atomically, and returns an
Artifact. A stage whose inputs hash the same as last time, with its outputs
intact on disk, is skipped.
"""
from __future__ import annotations

import errno
import functools
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from . import __version__
from .artifacts import Artifact, Manifest, atomic_dir, sha256_json
from .data.text import Corpus, load_corpus
from .data.tokens import token_stream, windows
from .errors import EdgeDistillError
from .progress import console
from .recipe import Recipe

STAGE_ORDER = ["teacher", "hybrid_teacher", "student_init", "distill", "hybrid_student", "compress", "export", "routing",
               "eval", "devices", "report"]
VERSIONED = ["torch", "transformers", "tokenizers", "safetensors", "gguf", "onnx", "onnxruntime", "onnxscript",
             "llama_cpp_python", "numpy", "fastapi"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "edgedistill": __version__}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


@dataclass
class BuildContext:
    recipe: Recipe
    out_dir: Path
    manifest: Manifest
    _cache: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out_dir.joinpath(*parts)

    def metrics(self, stage: str) -> dict:
        return self.manifest.stages[stage]["metrics"]

    @functools.cached_property
    def teacher_dir(self) -> str:
        return self.metrics("teacher")["model_dir"]

    @property
    def student_dir(self) -> Path:
        """The student that is compressed, exported and evaluated: trained in both thinking modes when routing is on."""
        return self.path("student_hybrid" if self.recipe.routing.enabled else "student")

    @functools.cached_property
    def tokenizer(self):
        from .models import load_tokenizer
        return load_tokenizer(self.teacher_dir)

    @functools.cached_property
    def corpus(self) -> Corpus:
        d = self.recipe.data
        return load_corpus(d.source, d.max_chars, d.heldout_fraction, d.seed)

    @functools.cached_property
    def train_stream(self) -> list[int]:
        r = self.recipe.distill
        need = (r.steps * r.batch_size * r.grad_accum + self.recipe.student.calib_windows + 8) * r.seq_len
        return token_stream(self.tokenizer, self.corpus.train, max_tokens=need)

    @functools.cached_property
    def eval_windows(self) -> list[list[int]]:
        e = self.recipe.eval
        stream = token_stream(self.tokenizer, self.corpus.heldout, max_tokens=e.windows * e.seq_len)
        return windows(stream, e.seq_len, e.windows, what="held-out text")


# ------------------------------------------------------------------ stages
def stage_teacher(ctx: BuildContext) -> Artifact:
    from .models import load_causal_lm, model_fingerprint, resolve_model
    model_dir = resolve_model(ctx.recipe.teacher.model)
    model = load_causal_lm(model_dir)
    return Artifact([], {"model_dir": model_dir, "fingerprint": model_fingerprint(model_dir),
                         "architecture": type(model).__name__, "layers": model.config.num_hidden_layers,
                         "params": sum(p.numel() for p in model.parameters())})


def stage_student_init(ctx: BuildContext) -> Artifact:
    from .distill.prune import make_depth_pruned_student
    from .models import load_causal_lm, resolve_model
    s = ctx.recipe.student
    dest = ctx.path("student_init")
    with atomic_dir(dest) as tmp:
        if s.init == "model":
            model = load_causal_lm(resolve_model(s.model))
            model.save_pretrained(tmp)
            ctx.tokenizer.save_pretrained(tmp)
            metrics = {"init": "model", "source": s.model, "student_params": sum(p.numel() for p in model.parameters())}
        else:
            calib = windows(ctx.train_stream, ctx.recipe.distill.seq_len, s.calib_windows, what="calibration text")
            teacher = load_causal_lm(ctx.teacher_dir)
            metrics = {"init": "depth_prune", **make_depth_pruned_student(teacher, ctx.tokenizer, calib, s.keep_ratio, tmp,
                                                                            width_ratio=s.width_ratio)}
    return Artifact([dest], metrics)


def stage_distill(ctx: BuildContext) -> Artifact:
    from .distill.run import run_distill
    from .distill.teacher import load_teacher
    from .models import load_causal_lm
    d = ctx.recipe.distill
    teacher = load_teacher(ctx.teacher_dir, d.teacher_quant)
    student = load_causal_lm(str(ctx.path("student_init")))
    dest = ctx.path("student")
    # Checkpoints and the offline teacher cache live beside the build, keyed by the stage's inputs, so a rerun
    # of the same recipe resumes and a changed recipe starts over.
    work = ctx.path("distill_work", sha256_json(stage_inputs(ctx, "distill"))[:16])
    heldout = ctx.eval_windows if d.eval_every else None
    with atomic_dir(dest) as tmp:
        metrics = run_distill(teacher, student, ctx.tokenizer, d, None if d.chat_data else ctx.train_stream, tmp,
                              work, heldout_windows=heldout)
    return Artifact([dest], metrics)


def stage_compress(ctx: BuildContext) -> Artifact:
    from .compress.rtn import CODES_FILE
    from .compress.stage import compress_model
    spec = ctx.recipe.compress
    dest = ctx.path("compressed")
    if spec.method == "none":
        return Artifact([], {"method": "none"})
    stream = token_stream(ctx.tokenizer, ctx.corpus.train, max_tokens=spec.calib_windows * spec.calib_seq_len)
    calib = windows(stream, spec.calib_seq_len, spec.calib_windows, what="calibration text")
    qat = ctx.student_dir / "qat" / CODES_FILE
    with atomic_dir(dest) as tmp:
        metrics = compress_model(ctx.student_dir, tmp, spec, ctx.tokenizer, calib,
                                 ctx.eval_windows[:spec.eval_windows],
                                 qat_codes=qat if spec.method in ("qat", ctx.recipe.distill.quantize_aware) else None)
    return Artifact([dest], metrics)


def stage_export(ctx: BuildContext) -> Artifact:
    from .compress.rtn import CODES_FILE, load_codes
    from .export.gguf import write_gguf
    exp = ctx.recipe.export
    dest = ctx.path("export")
    metrics: dict = {"gguf": {}, "onnx": None}
    compressed = ctx.path("compressed")
    codes_file = compressed / CODES_FILE
    grid = ctx.metrics("compress").get("grid") or (ctx.metrics("compress").get("config") or {}).get("grid")
    # Pruning changes the model itself, so every format is exported from it; a pure quantizer's codes
    # are used for their own grid, the other formats come from the unquantized student.
    reshaped = ctx.recipe.compress.method in ("sparsegpt", "structured")
    with atomic_dir(dest) as tmp:
        for qtype in exp.gguf:
            src, codes = (compressed / "model" if reshaped else ctx.student_dir), None
            if qtype == grid and codes_file.is_file():
                src, codes = compressed / "model", load_codes(codes_file)
            name = f"student-{qtype}.gguf"
            info = write_gguf(src, tmp / name, dtype=qtype, codes=codes)
            metrics["gguf"][f"export/{name}"] = {**info, "from_codes": codes is not None}
        if exp.onnx:
            from .export.onnx import export_onnx
            from .export.onnx_quant import quantize_onnx
            info = export_onnx(compressed / "model" if reshaped else ctx.student_dir, tmp / "student.onnx",
                               graph=exp.onnx_graph)
            metrics["onnx"] = {k: v for k, v in info.items() if k not in ("files", "inputs", "outputs")}
            metrics["onnx"]["graph"] = exp.onnx_graph
            # compress/'s codes become the int8 (q8_0) / int4 (q4_0, q4_1) weights they cover, bit for bit
            onnx_codes = load_codes(codes_file) if exp.onnx_quant and codes_file.is_file() else None
            for kind in exp.onnx_quant:
                metrics[f"onnx_{kind}"] = quantize_onnx(tmp / "student.onnx", tmp / f"student-{kind}.onnx", kind,
                                                        codes=onnx_codes)
    return Artifact([dest], metrics)


def exported_files(ctx: BuildContext) -> list[str]:
    return [o["path"] for o in ctx.manifest.stages["export"]["outputs"] if o["path"].endswith((".gguf", ".onnx"))]


def stage_eval(ctx: BuildContext) -> Artifact:
    from .evaluate import evaluate, torch_logits_fn
    from .models import load_causal_lm
    runners = {"teacher": torch_logits_fn(load_causal_lm(ctx.teacher_dir)),
               "student_init": torch_logits_fn(load_causal_lm(str(ctx.path("student_init")))),
               "student": torch_logits_fn(load_causal_lm(str(ctx.student_dir)))}
    if ctx.path("compressed", "model").is_dir():
        runners["compressed"] = torch_logits_fn(load_causal_lm(str(ctx.path("compressed", "model"))))
    closers = []
    for rel in exported_files(ctx):
        if rel.endswith(".gguf"):
            from .export.llamacpp import LlamaCppModel
            m = LlamaCppModel(ctx.path(rel), n_ctx=max(512, ctx.recipe.eval.seq_len))
        else:
            from .export.ort import OnnxModel
            m = OnnxModel(ctx.path(rel))
        closers.append(m)
        runners[rel] = m.logits
    try:
        metrics = evaluate(ctx.eval_windows, runners, reference="student")
    finally:
        for m in closers:
            if hasattr(m, "close"):
                m.close()
    sizes = {o["path"]: o["bytes"] for o in ctx.manifest.stages["export"]["outputs"]}
    metrics["bytes"] = {rel: sizes[rel] for rel in exported_files(ctx)}
    if ctx.recipe.eval.decode_tokens:
        metrics["decode_tps"] = {rel: round(m.decode_tokens_per_s(ctx.recipe.eval.decode_tokens), 2)
                                 for rel, m in zip(exported_files(ctx), _reopen(ctx))}
    from .evaluate import check_gates
    metrics["gates"] = check_gates(metrics, ctx.recipe.eval, exported_files(ctx))
    if ctx.recipe.routing.enabled:
        from .routing.report import ROWS
        r = ctx.metrics("routing")
        keys = [k for _, acc, tok, _ in ROWS for k in (acc, tok)] + [
            "teacher_acc", "teacher_tokens", "teacher_mode", "teacher_calib_acc", "routed_vs_best_teacher",
            "student_acc_think", "student_acc_nothink", "teacher_acc_nothink", "escalation_rate",
            "target_escalation_rate", "think_rate", "budget_hits", "routed_vs_teacher", "adaptive_token_saving",
            "policy_overhead_ms_p95", "think_threshold", "escalation_threshold", "calib_escalation_rate", "target",
            "latency_s", "test_size", "calib_size", "generation_backend", "escalation_calibration"]
        metrics["routing"] = {k: r[k] for k in keys if k in r}
    return Artifact([], metrics)


def _reopen(ctx: BuildContext):
    """Each exported file opened again (one at a time), for timing."""
    for rel in exported_files(ctx):
        if rel.endswith(".gguf"):
            from .export.llamacpp import LlamaCppModel
            with LlamaCppModel(ctx.path(rel), n_ctx=512) as m:
                yield m
        else:
            from .export.ort import OnnxModel
            yield OnnxModel(ctx.path(rel))


def _work(ctx: BuildContext, name: str) -> Path:
    return ctx.path("routing_work", name, sha256_json(stage_inputs(ctx, name))[:16])


def stage_hybrid_teacher(ctx: BuildContext) -> Artifact:
    """Routing on: the teacher fine-tuned on the suite's thinking and direct samples (+ its GGUF)."""
    if not ctx.recipe.routing.enabled:
        return Artifact([], {"enabled": False})
    import shutil

    from .routing.stage import adapt_teacher
    dest = ctx.path("teacher_hybrid")
    with atomic_dir(dest) as tmp:
        metrics = adapt_teacher(ctx.teacher_dir, ctx.tokenizer, ctx.recipe.routing, _hybrid_precision(ctx), tmp,
                                _work(ctx, "hybrid_teacher"))
    shutil.rmtree(ctx.path("routing_work", "hybrid_teacher"), ignore_errors=True)
    return Artifact([dest], metrics)


def stage_hybrid_student(ctx: BuildContext) -> Artifact:
    """Routing on: the distilled student trained in both modes from the adapted teacher."""
    if not ctx.recipe.routing.enabled:
        return Artifact([], {"enabled": False})
    import shutil

    from .routing.stage import distill_hybrid
    dest = ctx.path("student_hybrid")
    with atomic_dir(dest) as tmp:
        metrics = distill_hybrid(ctx.path("student"), ctx.path("teacher_hybrid"), ctx.tokenizer, ctx.recipe.routing,
                                 _hybrid_precision(ctx), ctx.recipe.distill.quantize_aware, tmp,
                                 _work(ctx, "hybrid_student"))
    shutil.rmtree(ctx.path("routing_work", "hybrid_student"), ignore_errors=True)
    return Artifact([dest], metrics)


def stage_routing(ctx: BuildContext) -> Artifact:
    """Routing on: calibrate router.json on the suite's calibration split, evaluate on its held-out split."""
    if not ctx.recipe.routing.enabled:
        return Artifact([], {"enabled": False})
    from .errors import RoutingError
    from .routing.stage import calibrate_and_evaluate
    ggufs = [rel for rel in exported_files(ctx) if rel.endswith(".gguf")]
    if not ggufs:
        raise RoutingError("routing is enabled but no GGUF is exported; add q8_0 to export.gguf (the router is "
                           "calibrated on the file that is served) or set routing.enabled: false.")
    student = "export/student-q8_0.gguf" if "export/student-q8_0.gguf" in ggufs else ggufs[0]
    metrics, outputs = calibrate_and_evaluate(ctx.path(student), ctx.path("teacher_hybrid", "teacher-q8_0.gguf"),
                                              ctx.tokenizer, ctx.recipe.routing, ctx.out_dir)
    return Artifact(outputs, metrics)


def stage_devices(ctx: BuildContext) -> Artifact:
    from .devices.plan import fit_build, place_for_device
    d = ctx.recipe.devices
    outputs, metrics = [], {}
    for device in d.targets:
        report = fit_build(ctx.out_dir, device, context=d.context, ppl_tolerance=d.ppl_tolerance)
        outputs.append(place_for_device(ctx.out_dir, report))
        metrics[device] = report
    return Artifact(outputs, metrics)


def stage_report(ctx: BuildContext) -> Artifact:
    from .report import write_report
    return Artifact(write_report(ctx.out_dir, ctx.manifest), {})


STAGES: dict[str, Callable[[BuildContext], Artifact]] = {
    "teacher": stage_teacher, "hybrid_teacher": stage_hybrid_teacher, "student_init": stage_student_init,
    "distill": stage_distill, "hybrid_student": stage_hybrid_student, "compress": stage_compress,
    "export": stage_export, "routing": stage_routing, "eval": stage_eval, "devices": stage_devices,
    "report": stage_report,
}


_HYBRID_TEACHER_FIELDS = ("seed", "train_size", "teacher_steps", "teacher_lr", "teacher_ce_weight", "batch_size", "seq_len")
_HYBRID_STUDENT_FIELDS = ("seed", "train_size", "student_steps", "student_lr", "student_ce_weight", "sequence_kd_fraction",
                          "batch_size", "seq_len", "think_budget", "answer_tokens")


def _hybrid_precision(ctx: BuildContext) -> str:
    return _resolved_precision(ctx.recipe.routing.precision)


def _resolved_precision(p: str) -> str:
    """A precision field as training resolves it; part of the stage inputs, so a resumed build on other
    hardware does not keep a stage trained at another precision."""
    from .distill.train import resolve_precision
    return resolve_precision(p)


def _sample_format() -> int:
    from .data.tasks import SAMPLE_FORMAT
    return SAMPLE_FORMAT


def stage_inputs(ctx: BuildContext, name: str) -> dict:
    r = ctx.recipe
    fp = ctx.manifest.output_fingerprint
    rt = r.routing
    # With routing off, the stages before it hash as they always did (no rebuild of existing builds).
    routed = (lambda d, *stages: d | {s: fp(s) for s in stages}) if rt.enabled else (lambda d, *stages: d)
    if name == "teacher":
        return {"teacher": r.teacher.model_dump()}
    if name == "hybrid_teacher":
        return {"enabled": False} if not rt.enabled else {
            "teacher": fp("teacher"), "precision": _hybrid_precision(ctx), "sample_format": _sample_format(),
            "routing": {k: getattr(rt, k) for k in _HYBRID_TEACHER_FIELDS}}
    if name == "student_init":
        return {"teacher": fp("teacher"), "student": r.student.model_dump(), "data": r.data.model_dump(),
                "seq_len": r.distill.seq_len}
    if name == "distill":
        return {"teacher": fp("teacher"), "student_init": fp("student_init"), "distill": r.distill.model_dump(),
                "data": r.data.model_dump(), "precision": _resolved_precision(r.distill.precision)}
    if name == "hybrid_student":
        return {"enabled": False} if not rt.enabled else {
            "distill": fp("distill"), "hybrid_teacher": fp("hybrid_teacher"), "precision": _hybrid_precision(ctx),
            "quantize_aware": r.distill.quantize_aware, "sample_format": _sample_format(), "routing": {k: getattr(rt, k) for k in _HYBRID_STUDENT_FIELDS}}
    if name == "compress":
        return routed({"student": fp("distill"), "compress": r.compress.model_dump()}, "hybrid_student")
    if name == "export":
        return routed({"student": fp("distill"), "compressed": fp("compress"), "export": r.export.model_dump()},
                      "hybrid_student")
    if name == "routing":
        return {"enabled": False} if not rt.enabled else {
            "export": fp("export"), "hybrid_teacher": fp("hybrid_teacher"), "routing": rt.model_dump()}
    if name == "eval":
        return routed({s: fp(s) for s in ("teacher", "student_init", "distill", "compress", "export")} | {
            "eval": r.eval.model_dump(), "data": r.data.model_dump()}, "hybrid_student", "routing")
    if name == "devices":
        return {"export": fp("export"), "eval": fp("eval"), "devices": r.devices.model_dump()}
    if name == "report":
        return routed({"eval": fp("eval"), "distill": fp("distill"), "export": fp("export"), "devices": fp("devices")},
                      "routing")
    raise KeyError(name)


def _teacher_unchanged(manifest: Manifest, name: str) -> bool:
    """The teacher lives outside the build folder (a cache or the user's folder): check it did not change."""
    if name != "teacher":
        return True
    from .models import model_fingerprint
    m = manifest.stages[name]["metrics"]
    return model_fingerprint(m["model_dir"]) == m["fingerprint"]


def _quiet_libraries() -> None:
    """Our own progress bars speak for the stages; silence transformers' per-load bars."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


PAUSE_ENV = "EDGEDISTILL_TEST_PAUSE_STAGE"


def _test_pause(name: str) -> None:
    """Test-only hook for the crash-resume tests: with EDGEDISTILL_TEST_PAUSE_STAGE=<stage>, the build stops after
    that stage wrote its outputs but before the manifest records it (the worst moment to be killed), prints
    `paused in <stage>` and sleeps until killed. Unset (always, outside tests), it does nothing."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused in {name}", flush=True)
        while True:
            time.sleep(60)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """A build killed mid-write leaves atomic-write temporaries (`.<name>.<random>.tmp`, `.<name>.old-<pid>`);
    they never look complete, but they take space: clear them before a new run."""
    for p in out_dir.glob(".*"):
        if p.name.endswith(".tmp") or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _errno_of(e: BaseException) -> int | None:
    """OSError's errno, or the one safetensors' Rust writer puts in its message ('... (os error 28)')."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"os error (\d+)", str(e))
    return int(m.group(1)) if m else None


def _is_io_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and _errno_of(e) is not None)


def _io_error_message(stage: str | None, out_dir: Path, e: BaseException) -> str:
    code = _errno_of(e)
    where = f"stage '{stage}'" if stage else "the build"
    if code in NO_SPACE:
        what = f"the disk holding '{out_dir}' is full (or a file size limit was hit)"
        todo = "free some space or choose another --out"
    elif code in NOT_WRITABLE:
        what = f"'{out_dir}' is not writable"
        todo = "fix its permissions or choose another --out"
    else:
        what, todo = "a file could not be read or written", "check the paths named above"
    return (f"{where} failed: {what} ({type(e).__name__}: {e}). Nothing half-written was kept: finished stages "
            f"stay recorded in the manifest and a rerun resumes after them; {todo}.")


def run_build(recipe: Recipe, out_dir: Path, *, force: bool = False, log: Callable[[str], None] | None = None) -> Manifest:
    log = log or (lambda msg: console.print(msg))
    _quiet_libraries()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeDistillError(f"cannot create output folder '{out_dir}': {e}. Choose a writable --out.") from None
    _remove_stale_temporaries(out_dir)
    manifest = Manifest(out_dir)
    manifest.data["recipe"] = recipe.model_dump(mode="json")
    manifest.data["versions"] = package_versions()
    manifest.data["edgedistill_version"] = __version__
    try:
        manifest.save()
    except OSError as e:
        raise EdgeDistillError(_io_error_message(None, out_dir, e)) from None
    ctx = BuildContext(recipe, out_dir, manifest)
    total = time.perf_counter()
    for name in STAGE_ORDER:
        input_hash = sha256_json(stage_inputs(ctx, name))
        if not force and manifest.is_fresh(name, input_hash) and _teacher_unchanged(manifest, name):
            log(f"[dim]✓ {name}: up to date, skipped[/dim]")
            continue
        log(f"[bold cyan]▶ {name}[/bold cyan]")
        manifest.invalidate(name)
        t0 = time.perf_counter()
        try:
            art = STAGES[name](ctx)
            _test_pause(name)
            manifest.record(name, input_hash, time.perf_counter() - t0, art)
        except Exception as e:
            if not _is_io_error(e):
                raise
            raise EdgeDistillError(_io_error_message(name, out_dir, e)) from None
        log(f"[green]✓ {name}[/green] ({time.perf_counter() - t0:.1f}s)")
    manifest.data["build_seconds_last_run"] = round(time.perf_counter() - total, 2)
    manifest.save()
    return manifest
