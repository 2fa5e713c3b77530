"""What `edgedistill serve` runs: which backend, which file of the build, and how big.

`plan_serving` decides (no model is loaded); `open_backend` loads what the plan names.
Without `--device` the backend defaults to llama.cpp and the file to the build's preferred
export (q8_0 GGUF, int8 ONNX, the compressed model folder). With `--device PROFILE` the file
is the one the build chose for that profile (its `devices` manifest section, or the same fit
computed now when the build did not target it), and threads, context and slots come from the
profile: as many slots as the profile's memory budget holds next to the weights (at most 8).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..artifacts import MANIFEST
from ..errors import DeviceError, ServeError
from .backend import Backend, LlamaCppBackend, _export_outputs, pick_gguf

BackendKind = Literal["llamacpp", "onnx", "transformers"]
BACKENDS: tuple[str, ...] = ("llamacpp", "onnx", "transformers")
RUNTIME_OF = {"llamacpp": "llama.cpp", "onnx": "onnxruntime", "transformers": "transformers"}
DEFAULT_SLOTS, DEFAULT_CTX, MAX_AUTO_SLOTS = 8, 2048, 8
TORCH_OVERHEAD_MB = 300.0  # the torch + transformers runtime itself, resident next to the weights
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ServePlan:
    backend: str
    path: Path                  # .gguf / .onnx file, or an HF model folder for transformers
    tokenizer_dir: Path | None  # onnx: where the tokenizer and chat template live
    name: str                   # the model id clients see
    slots: int
    ctx: int
    threads: int | None         # per worker; None = the runtime's own choice
    workers: int
    device: str | None = None
    memory: dict[str, float] | None = None  # device budget arithmetic, when a device was named

    def describe(self) -> str:
        where = f" for {self.device}" if self.device else ""
        return (f"{self.backend} on {self.path}{where}: {self.workers} worker(s) × {self.slots} slot(s), "
                f"{self.ctx} tokens of context, threads {self.threads or 'auto'}")


def plan_serving(target: str | Path, *, backend: str | None = None, device: str | None = None,
                 slots: int | None = None, ctx: int | None = None, threads: int | None = None,
                 workers: int = 1) -> ServePlan:
    target = Path(target)
    if backend is not None and backend not in BACKENDS:
        raise ServeError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if workers < 1:
        raise ServeError(f"workers must be at least 1, got {workers}.")
    name = target.resolve().name if target.is_dir() else target.stem
    if device is None:
        kind = backend or _kind_of_file(target) or "llamacpp"
        path, tok = _default_artifact(target, kind)
        per_worker = _split_threads(threads, workers)
        return ServePlan(kind, path, tok, name, slots or DEFAULT_SLOTS, ctx or DEFAULT_CTX, per_worker, workers)
    return _plan_for_device(target, name, device, backend, slots, ctx, threads, workers)


def open_backend(plan: ServePlan, *, max_queue: int = 64) -> Backend:
    def one() -> Backend:
        if plan.backend == "llamacpp":
            return LlamaCppBackend(plan.path, slots=plan.slots, ctx_per_slot=plan.ctx, n_threads=plan.threads,
                                   max_queue=max_queue, name=plan.name)
        if plan.backend == "onnx":
            from .onnx_backend import OnnxBackend
            return OnnxBackend(plan.path, plan.tokenizer_dir or plan.path.parent, n_ctx=plan.ctx,
                               threads=plan.threads, name=plan.name, max_queue=max_queue)
        from .torch_backend import TransformersBackend
        return TransformersBackend(plan.path, slots=plan.slots, n_ctx=plan.ctx, n_threads=plan.threads,
                                   max_queue=max_queue, name=plan.name)

    if plan.workers == 1:
        return one()
    from .pool import WorkerPool
    return WorkerPool([one() for _ in range(plan.workers)])


# ---------------------------------------------------------------- without a device: the build's preferred file
def _kind_of_file(target: Path) -> str | None:
    if target.is_file():
        return {".gguf": "llamacpp", ".onnx": "onnx"}.get(target.suffix.lower())
    if target.is_dir() and (target / "config.json").is_file() and not (target / MANIFEST).is_file():
        return "transformers"  # a bare Hugging Face model folder
    return None


def _default_artifact(target: Path, kind: str) -> tuple[Path, Path | None]:
    if kind == "llamacpp":
        return pick_gguf(target), None
    if kind == "onnx":
        if target.is_file():
            if target.suffix.lower() != ".onnx":
                raise ServeError(f"{target} is not an .onnx file; the onnx backend serves a build folder or an "
                                 ".onnx file (with tokenizer.json beside it).")
            return target.resolve(), _tokenizer_dir(target.parent, target.parent)
        onnx = [o["path"] for o in _export_outputs(target.resolve()) if o["path"].lower().endswith(".onnx")]
        if not onnx:
            raise ServeError(f"the build folder {target} has no ONNX export in its {MANIFEST}. Enable "
                             "`export.onnx` in the recipe and rebuild, or serve with --backend llamacpp.")
        onnx.sort(key=lambda p: (not Path(p).stem.endswith("int8"), Path(p).stem.endswith("int4")))
        return _inside(target, onnx[0]), _tokenizer_dir(target, target / "student")
    return _hf_dir(target), None


def _hf_dir(target: Path) -> Path:
    """The HF folder to serve with transformers: the folder itself, or the build's compressed model (what
    the exported files hold), else its student."""
    if target.is_file():
        raise ServeError(f"{target} is a file; the transformers backend serves a Hugging Face model folder or a "
                         "build folder.")
    for d in (target, target / "compressed" / "model", target / "student"):
        if (d / "config.json").is_file():
            return d.resolve()
    raise ServeError(f"{target} holds no Hugging Face model (no config.json in it, compressed/model/ or "
                     "student/). Run `edgedistill build` first, or pass a model folder.")


def _tokenizer_dir(*candidates: Path) -> Path:
    for d in candidates:
        if (d / TOKENIZER_FILE).is_file():
            return d
    raise ServeError(f"no {TOKENIZER_FILE} in {' or '.join(str(c) for c in candidates)}; the onnx backend needs the "
                     "tokenizer the model was exported with. Rebuild, or copy it next to the .onnx file.")


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root.resolve()):
        raise ServeError(f"{MANIFEST} in {root} lists {rel!r}, which lies outside the build folder; rebuild it.")
    if not path.is_file():
        raise ServeError(f"{rel} is listed in {root / MANIFEST} but missing on disk. Run `edgedistill build "
                         f"--out {root}` again.")
    return path


def _split_threads(threads: int | None, workers: int) -> int | None:
    """`threads` is the total for the server; with several workers and no total, the cores are shared out."""
    if threads is None:
        return None if workers == 1 else max(1, (os.cpu_count() or 1) // workers)
    return max(1, threads // workers)


# ---------------------------------------------------------------- with a device profile
def _device_report(target: Path, device: str) -> dict[str, Any]:
    """The build's fit for `device` (manifest), or the same fit computed now."""
    from ..devices.plan import fit_build
    from ..devices.profiles import load_profile

    try:
        load_profile(device, measure=False)  # the name is known (the host is measured only if fitted below)
    except DeviceError as e:
        raise ServeError(str(e)) from None
    if not target.is_dir() or not (target / MANIFEST).is_file():
        raise ServeError(f"--device needs a build folder (with {MANIFEST}); {target} is not one.")
    data = json.loads((target / MANIFEST).read_text())
    devices = (data.get("stages", {}).get("devices") or {}).get("metrics") or {}
    if isinstance(devices.get(device), dict) and devices[device].get("choice"):
        return devices[device]
    try:
        return fit_build(target, device)
    except DeviceError as e:
        raise ServeError(str(e)) from None


def _plan_for_device(target: Path, name: str, device: str, backend: str | None, slots: int | None,
                     ctx: int | None, threads: int | None, workers: int) -> ServePlan:
    rep = _device_report(target, device)
    profile, choice = rep["profile"], rep["choice"]
    kind = backend or {v: k for k, v in RUNTIME_OF.items()}[choice["runtime"]]
    if kind != "transformers" and RUNTIME_OF[kind] != choice["runtime"]:
        runtime = RUNTIME_OF[kind]
        usable = [f for f in rep["fits"] if f["runtime"] == runtime and f["fits"] and f["supported"]]
        if not usable:
            raise ServeError(f"no {runtime} file of {target} fits {device} (the build chose {choice['path']}); "
                             f"drop --backend to serve that, or export a file {runtime} runs there.")
        choice = max(usable, key=lambda f: f["decode_tps"])
    ctx = ctx or int(profile["default_context"])
    budget = float(profile["budget_gb"]) * 1000.0
    if kind == "transformers":
        path, tok = _hf_dir(target), None
        from ..devices.fit import ModelShape
        shape = ModelShape.from_model_dir(path)
        weights, overhead = shape.params * 4 / 1e6, TORCH_OVERHEAD_MB
        kv_slot = shape.kv_bytes_per_token(4) * ctx / 1e6
        shared = False
    else:
        placed = target / device / Path(choice["path"]).name
        path = placed.resolve() if placed.is_file() else _inside(target, choice["path"])
        tok = _tokenizer_dir(path.parent, target / "student") if kind == "onnx" else None
        weights, overhead = float(choice["weights_mb"]), float(choice["overhead_mb"])
        kv_slot = float(choice["kv_cache_mb"]) * ctx / int(choice["context"])
        shared = kind == "llamacpp"  # llama.cpp maps the file: its workers share one copy of the weights
    free = budget - weights * (1 if shared else workers) - overhead * workers
    max_slots = 1 if kind == "onnx" else math.floor(free / (kv_slot * workers)) if kv_slot > 0 else MAX_AUTO_SLOTS
    memory = {"budget_mb": round(budget, 1), "weights_mb": round(weights, 1), "overhead_mb": round(overhead, 1),
              "kv_per_slot_mb": round(kv_slot, 2), "max_slots": max_slots}
    if free < kv_slot * workers or max_slots < 1:
        raise ServeError(f"{device}'s memory budget ({budget:.0f} MB) does not hold {workers} worker(s) of "
                         f"{path.name} with one {ctx}-token slot each ({weights:.0f} MB weights, {overhead:.0f} MB "
                         f"runtime, {kv_slot:.1f} MB KV per slot). Lower --ctx or --workers.")
    if slots is not None and kind != "onnx" and slots > max_slots:
        raise ServeError(f"--slots {slots} does not fit {device}'s memory budget ({budget:.0f} MB): at {ctx} "
                         f"tokens each, at most {max_slots} slot(s) per worker fit. Lower --slots or --ctx.")
    slots = 1 if kind == "onnx" else slots or min(MAX_AUTO_SLOTS, max_slots)
    # A measured profile (host) is this machine: all its cores, unlike its one-thread benchmark setting.
    total = threads or ((os.cpu_count() or 1) if profile.get("measure") else int(profile["threads"]))
    per_worker = max(1, total // workers)
    return ServePlan(kind, path, tok, name, slots, ctx, per_worker, workers, device, memory)
