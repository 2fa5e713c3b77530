"""Local training / evaluation text with a clear license.

The default corpus is the Python standard library's own sources and docstrings
(PSF license), which every Python install carries. Users point `data.source` at
a text file or a folder of text files instead.
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}

# Modules whose sources are mostly data tables or generated code: poor language.
_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "encodings", "site-packages", "__pycache__", "turtledemo", "pydoc_data"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not (_SKIP_PARTS & set(p.relative_to(root).parts))]
    if not files:
        raise DataError(f"no Python standard library sources found under {root}; set data.source to a text file or folder.")
    return files


def source_files(source: str) -> list[Path]:
    if source == "stdlib":
        return stdlib_files()
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [q for q in sorted(p.rglob("*")) if q.is_file() and q.suffix in TEXT_SUFFIXES]
        if not files:
            raise DataError(f"data.source folder '{source}' holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
        return files
    raise DataError(f"data.source '{source}' is neither 'stdlib' nor an existing file or folder.")


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]
    fingerprint: str

    @property
    def train_chars(self) -> int:
        return sum(map(len, self.train))


def load_corpus(source: str = "stdlib", max_chars: int = 3_000_000, heldout_fraction: float = 0.05, seed: int = 0) -> Corpus:
    """Read documents, split train / held-out by document (deterministic for a seed)."""
    docs: list[str] = []
    total = 0
    files = source_files(source)
    random.Random(seed).shuffle(files)
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.strip()
        if len(text) < 200:
            continue
        text = text[: max_chars - total]
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if total < 10_000 or len(docs) < 2:
        raise DataError(f"data.source '{source}' gives only {total} characters in {len(docs)} documents; need at least 10,000 characters in 2 documents.")
    n_held = max(1, round(len(docs) * heldout_fraction))
    heldout, train = docs[:n_held], docs[n_held:]
    fp = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    return Corpus(train=train, heldout=heldout, fingerprint=fp)
