"""Export a Hugging Face causal LM to ONNX with the dynamo exporter.

A *graph* is a small wrapper module that fixes the ONNX signature (input and
output names, dynamic axes, example inputs). `logits`: input_ids int64
[batch, seq] -> logits float32 [batch, seq, vocab], positions 0..seq-1, no
padding mask. `kv_cache`: the same plus past_key_values.{i}.key/value
[batch, kv_heads, past, head_dim] in and present.{i}.key/value
[batch, kv_heads, past + seq, head_dim] out (positions past..past+seq-1), so
decoding is incremental; past may be 0 for the first step.

The file is written atomically: the exporter saves into a temporary sibling
folder under the final file name (so an external-data reference stays valid),
the checker runs there, and only then are the files moved into place.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..artifacts import atomic_path
from ..errors import ExportError


# ---------------------------------------------------------------- graphs
def _logits_module(model: Any) -> Any:
    import torch

    class LogitsGraph(torch.nn.Module):
        """input_ids [B, T] -> logits [B, T, V]; positions are 0..T-1 (no padding, no cache)."""

        def __init__(self, lm: Any):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return LogitsGraph(model)


def _logits_example(model: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch
    from torch.export import Dim

    # Example sizes > 1 so torch.export does not specialise either axis to a constant.
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=max_pos)
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
    return (example,), {"input_ids": {0: batch, 1: seq}}


def _logits_probes(model: Any) -> list[tuple[Any, ...]]:
    import torch

    # Shapes unlike the (2, 8) example: batch > 1 with another length, and a single token.
    g = torch.Generator().manual_seed(0)
    v = model.config.vocab_size
    return [(torch.randint(0, v, (2, 5), generator=g),), (torch.randint(0, v, (1, 1), generator=g),)]


def _kv_names(model: Any) -> tuple[list[str], list[str]]:
    n = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    return past, present


def _kv_module(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    class KVCacheGraph(torch.nn.Module):
        """input_ids [B, T] + per layer past key/value [B, kv_heads, P, head_dim] ->
        logits [B, T, V] + present key/value [B, kv_heads, P + T, head_dim]; positions P..P+T-1, no padding."""

        def __init__(self, lm: Any):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            out = self.lm(input_ids=input_ids, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return KVCacheGraph(model)


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv heads, head dim) of the cache tensors."""
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def _kv_inputs(model: Any, batch: int, seq: int, past: int, seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    kv, hd = kv_shape(model.config)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    cache = [torch.randn(batch, kv, past, hd, generator=g) for _ in _kv_names(model)[0]]
    return (ids, *cache)


def _kv_example(model: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from torch.export import Dim

    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
    args = _kv_inputs(model, 2, 3, 5)
    shapes = ({0: batch, 1: seq}, *[{0: batch, 2: past} for _ in args[1:]])
    return args, {"input_ids": shapes[0], "past": shapes[1:]}


def _kv_probes(model: Any) -> list[tuple[Any, ...]]:
    # The first step of a generation (no past), one decoded token, and a chunk after a longer past.
    return [_kv_inputs(model, 1, 6, 0, 1), _kv_inputs(model, 2, 1, 9, 2), _kv_inputs(model, 1, 4, 17, 3)]


@dataclass(frozen=True)
class GraphSpec:
    """The ONNX signature of one exported variant."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    wrap: Callable[[Any], Any]                                  # HF model -> nn.Module with that signature
    example: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]  # HF model -> (args, dynamic_shapes)
    probes: Callable[[Any], list[tuple[Any, ...]]]              # HF model -> inputs checked torch vs ORT


GRAPHS: dict[str, GraphSpec] = {
    "logits": GraphSpec(("input_ids",), ("logits",), _logits_module, _logits_example, _logits_probes),
    "kv_cache": GraphSpec(("input_ids", "past_key_values.*"), ("logits", "present.*"), _kv_module, _kv_example,
                          _kv_probes),
}


def io_names(spec: GraphSpec, model: Any) -> tuple[list[str], list[str]]:
    """The graph's input and output names, with `past_key_values.*` / `present.*` expanded per layer."""
    past, present = _kv_names(model)
    expand = {"past_key_values.*": past, "present.*": present}
    return ([n for x in spec.inputs for n in expand.get(x, [x])],
            [n for x in spec.outputs for n in expand.get(x, [x])])


# ---------------------------------------------------------------- export
MIN_OPSET = 18  # the dynamo exporter's floor (torchlib is written against opset 18+)
VERIFY_ATOL = 1e-3  # relative to the largest |logit|; fp32 export differences are ~1e-6


def load_causal_lm(model_dir: str | Path) -> Any:
    """The HF causal LM in fp32 eval mode with the KV cache off (what the logits graph traces)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - surface any loader failure as an export failure
        raise ExportError(f"could not load a causal LM from {model_dir}: {_condense(e)}. "
                          "Expected a Hugging Face model folder (config.json + weights); "
                          "point the export stage at the distilled/compressed model folder.") from e
    model.config.use_cache = False
    return model.eval()


def export_onnx(model_dir: str | Path, out_path: str | Path, opset: int | None = None, *,
                graph: str = "logits", external_data: bool | None = None) -> dict[str, Any]:
    """Export `model_dir` to `out_path`, plus `<out_path name>.data` holding the weights when
    `external_data` is True, or when it is None and the weights pass protobuf's 2 GB limit.

    Returns {"files", "bytes", "opset", "inputs", "outputs", "seconds"}; inputs/outputs are
    [{"name", "dtype", "shape"}] with symbolic axes as strings.
    """
    import onnx
    import torch

    if graph not in GRAPHS:
        raise ExportError(f"unknown ONNX graph {graph!r}; expected one of {sorted(GRAPHS)}.")
    spec = GRAPHS[graph]
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise ExportError(f"ONNX opset {opset} is not supported: the dynamo exporter needs {MIN_OPSET}..{newest} "
                          "with this onnx. Leave opset unset for the exporter's default.")
    out_path = Path(out_path)
    t0 = time.perf_counter()
    model = load_causal_lm(model_dir)
    module = spec.wrap(model).eval()
    args, dynamic_shapes = spec.example(model)
    inputs, outputs = io_names(spec, model)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        tmp_model = tmp_dir / out_path.name
        try:
            with torch.no_grad(), _quiet():
                program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                            input_names=inputs, output_names=outputs,
                                            dynamic_shapes=dynamic_shapes, report=False, verify=False)
            program.save(tmp_model, external_data=external_data)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; condense them all
            raise ExportError(f"torch.onnx.export (dynamo) failed for {model_dir}: {_condense(e)}. "
                              "Expected a standard HF causal LM (e.g. Llama) in fp32; check the model "
                              "architecture is supported by torch.export, or try another opset.") from e
        try:
            onnx.checker.check_model(str(tmp_model))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported ONNX graph failed onnx.checker: {_condense(e)}. "
                              "The exporter produced an invalid graph for this model/opset; retry with the "
                              "default opset, and report it with the model config if that fails too.") from e
        verify_against_torch(module, tmp_model, spec, spec.probes(model), (inputs, outputs))
        info = describe_onnx(tmp_model)
        names = ([i["name"] for i in info["inputs"]], [o["name"] for o in info["outputs"]])
        if names != (inputs, outputs):
            raise ExportError(f"the exported graph has inputs/outputs {names}; expected "
                              f"{(inputs, outputs)}. This is an exporter bug; report it.")
        files = _move_into_place(tmp_dir, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    return {"files": files, "bytes": sum(f.stat().st_size for f in files), "opset": info["opset"],
            "inputs": info["inputs"], "outputs": info["outputs"], "seconds": round(time.perf_counter() - t0, 2)}


def verify_against_torch(module: Any, path: Path, spec: GraphSpec, probes: list[tuple[Any, ...]],
                         names: tuple[list[str], list[str]] | None = None) -> None:
    """Run each probe through torch and onnxruntime; a graph that only works for the traced
    shapes (a baked-in length, a fused op ORT rejects) fails here, before anything is in place."""
    import numpy as np
    import onnxruntime as ort
    import torch

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures are raised below with ORT's message; don't also log them
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnxruntime refused the exported graph: {_condense(e)}. "
                          "Retry with the default opset.") from e
    in_names, out_names = names or (list(spec.inputs), list(spec.outputs))
    for args in probes:
        with torch.no_grad():
            want = module(*args)
        want = [t.numpy() for t in (want if isinstance(want, (tuple, list)) else [want])]
        shape = tuple(args[0].shape)
        try:
            got = session.run(out_names, {n: a.numpy() for n, a in zip(in_names, args)})
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported graph fails in onnxruntime for input shape {shape}: {_condense(e)}. "
                              "Retry with the default opset (fused ops of newer opsets may not "
                              "support every shape in onnxruntime).") from e
        for name, w, g in zip(out_names, want, got):
            err = float(np.abs(w - g).max()) if w.shape == g.shape else float("inf")
            if not err <= VERIFY_ATOL * max(1.0, float(np.abs(w).max())):
                raise ExportError(f"ONNX output {name!r} differs from torch for input shape {shape} "
                                  f"(max abs error {err:.3g}, shapes {w.shape} vs {g.shape}). Expected a "
                                  "graph valid for every batch and length; retry with the default opset.")


def _move_into_place(tmp_dir: Path, out_path: Path) -> list[Path]:
    """Move the model and its external-data files next to `out_path`; data first, model last."""
    model_tmp = tmp_dir / out_path.name
    data = sorted(p for p in tmp_dir.iterdir() if p.is_file() and p != model_tmp)
    stale = out_path.with_name(out_path.name + ".data")
    if stale.exists() and stale.name not in {p.name for p in data}:
        stale.unlink()  # a previous export wrote external data this one no longer uses
    placed = []
    for src in [*data, model_tmp]:
        dst = out_path.with_name(src.name)
        with atomic_path(dst) as tmp:
            src.replace(tmp)
        placed.append(dst)
    return [placed[-1], *placed[:-1]]


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """Opset and input/output signature, read without loading the weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)

    def sig(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {"opset": opset, "inputs": sig(m.graph.input), "outputs": sig(m.graph.output)}


# ---------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet():
    """The exporter prints progress to stdout and logs irrelevant notes (no torchvision); keep them
    out of the CLI's output. Errors still raise."""
    import io
    import logging
    import warnings

    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            yield
    finally:
        registry_log.setLevel(level)


def _condense(e: BaseException, limit: int = 400) -> str:
    """One line of the most specific reason: the innermost cause, first non-empty line, trimmed."""
    while e.__cause__ is not None and str(e.__cause__).strip():
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = re.sub(r"\s+", " ", lines[0] if lines else "") or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
