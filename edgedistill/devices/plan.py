"""Device fit for a whole build folder: which exported file each target device gets, and placing it there."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..artifacts import MANIFEST, atomic_dir, atomic_write_json
from ..errors import DeviceError
from .fit import Candidate, ModelShape, choose, explain_no_fit, fit_candidate, gguf_candidate, onnx_candidate
from .profiles import DeviceProfile, load_profile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json")


def _manifest(out_dir: Path) -> dict[str, Any]:
    p = out_dir / MANIFEST
    if not p.is_file():
        raise DeviceError(f"{out_dir} has no {MANIFEST}; pass a build folder (run `edgedistill build` first).")
    data = json.loads(p.read_text())
    if "export" not in data.get("stages", {}):
        raise DeviceError(f"{p} records no export stage; run `edgedistill build --out {out_dir}` first.")
    return data


def build_candidates(out_dir: Path) -> tuple[ModelShape, list[Candidate], dict[str, list[Path]]]:
    """Every exported GGUF / ONNX model of the build, with eval perplexities when the eval stage ran."""
    out_dir = Path(out_dir)
    data = _manifest(out_dir)
    shape = ModelShape.from_model_dir(out_dir / "student")
    ppl = data["stages"].get("eval", {}).get("metrics", {}).get("ppl", {})
    outputs = [o["path"] for o in data["stages"]["export"]["outputs"]]
    cands, files = [], {}
    for rel in outputs:
        if rel.endswith(".gguf"):
            cands.append(gguf_candidate(out_dir / rel, rel, ppl.get(rel)))
            files[rel] = [out_dir / rel]
        elif rel.endswith(".onnx"):
            group = [out_dir / rel] + [out_dir / o for o in outputs if o.startswith(rel + ".") or
                                       (o.startswith(rel[:-5] + ".") and o.endswith(".data"))]
            cands.append(onnx_candidate(group, rel, shape, ppl.get(rel)))
            files[rel] = group
    return shape, cands, files


def fit_build(out_dir: str | Path, device: str | DeviceProfile, *, context: int | None = None,
              ppl_tolerance: float = 0.01) -> dict[str, Any]:
    """{"device", "profile", "choice", "fits": [...]} for one device; DeviceError if nothing fits."""
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    shape, cands, _ = build_candidates(Path(out_dir))
    fits = [fit_candidate(c, shape, profile, context) for c in cands]
    best = choose(fits, ppl_tolerance)
    report = {"device": profile.name, "profile": profile.model_dump(mode="json"),
              "choice": best.as_dict() if best else None, "fits": [f.as_dict() for f in fits]}
    if best is None:
        raise DeviceError(explain_no_fit(profile.name, fits))
    return report


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def place_for_device(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """`out_dir/<device>/`: the chosen file (hard-linked when possible), tokenizer files for ONNX, device.json."""
    out_dir = Path(out_dir)
    _, _, files = build_candidates(out_dir)
    choice = report["choice"]["path"]
    dest = out_dir / report["device"]
    with atomic_dir(dest) as tmp:
        for f in files[choice]:
            _link_or_copy(f, tmp / f.name)
        if choice.endswith(".onnx"):
            for name in TOKENIZER_FILES:
                if (out_dir / "student" / name).is_file():
                    shutil.copy2(out_dir / "student" / name, tmp / name)
        atomic_write_json(tmp / "device.json", report)
    return dest
