"""The artifact contract: atomic writes, file hashes, the manifest, and resume.

Stages talk only through what they write into the build folder and what the
manifest says about it. A stage is re-run only when its inputs (its recipe
section and the hashes of the stages it reads) changed, or its outputs are gone
or altered on disk.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import EdgeDistillError

MANIFEST = "manifest.json"


# ---------------------------------------------------------------- atomic writes
def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        with open(tmp_p, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_p, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------- hashing
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def file_record(out_dir: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(out_dir).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def expand_outputs(paths: list[Path]) -> list[Path]:
    """Files, with folders expanded to the files inside them (sorted)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            files.append(p)
    return files


# ---------------------------------------------------------------- manifest
@dataclass
class Artifact:
    """What a stage hands on: its output paths (in the build folder) and its metrics."""
    outputs: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class Manifest:
    """`out/<name>/manifest.json`: recipe, versions, and one record per stage."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.data: dict[str, Any] = {"edgedistill_version": __version__, "recipe": {}, "versions": {}, "stages": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise EdgeDistillError(
                    f"{self.path} is not valid JSON ({e}). Delete it to rebuild from scratch.") from None
            if isinstance(loaded, dict) and isinstance(loaded.get("stages"), dict):
                self.data.update(loaded)

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def outputs_intact(self, name: str) -> bool:
        rec = self.stages.get(name)
        if not rec:
            return False
        for o in rec.get("outputs", []):
            p = self.out_dir / o["path"]
            if not p.is_file() or p.stat().st_size != o["bytes"] or sha256_file(p) != o["sha256"]:
                return False
        return True

    def is_fresh(self, name: str, input_hash: str) -> bool:
        rec = self.stages.get(name)
        return bool(rec and rec.get("status") == "done" and rec.get("input_hash") == input_hash
                    and self.outputs_intact(name))

    def record(self, name: str, input_hash: str, seconds: float, art: Artifact) -> None:
        self.stages[name] = {
            "status": "done",
            "seconds": round(seconds, 3),
            "input_hash": input_hash,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outputs": [file_record(self.out_dir, p) for p in expand_outputs(art.outputs)],
            "metrics": art.metrics,
        }
        self.save()

    def invalidate(self, name: str) -> None:
        if self.stages.pop(name, None) is not None:
            self.save()

    def output_fingerprint(self, name: str) -> str:
        rec = self.stages.get(name, {})
        return sha256_json({"in": rec.get("input_hash"), "out": [(o["path"], o["sha256"]) for o in rec.get("outputs", [])]})
