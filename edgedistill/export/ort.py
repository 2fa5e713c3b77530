"""Run an exported ONNX logits graph with onnxruntime on the CPU.

Kept apart from `onnx.py` so that serving and evaluation load only
onnxruntime and numpy, never torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError


class OnnxModel:
    """An onnxruntime session over a graph input_ids int64 [B, T] -> logits float32 [B, T, V]."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX model {self.path} does not exist. "
                              "Run the export stage first, or pass the path of the .onnx file.")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types (Fail, InvalidProtobuf, ...)
            reason = " ".join(str(e).split())
            raise ExportError(f"onnxruntime refused {self.path}: {reason}. Expected a complete ONNX model "
                              "(with its .data file next to it, if any); re-run the export stage.") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(int64)" or not outputs:
            found = [(i.name, i.type) for i in inputs]
            raise ExportError(f"{self.path} has inputs {found}; expected one int64 input_ids [batch, seq]. "
                              "Export it with edgedistill.export.onnx.export_onnx (graph 'logits').")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        vocab = outputs[0].shape[-1] if outputs[0].shape else None
        self.n_vocab: int | None = vocab if isinstance(vocab, int) else None

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits for every position: [T, V] for a 1-D token list, [B, T, V] for a 2-D batch."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ExportError(f"tokens of shape {ids.shape}; expected a non-empty 1-D sequence or a 2-D "
                              "[batch, seq] array of token ids.")
        batch = ids[None] if ids.ndim == 1 else ids
        if self.n_vocab is not None and (batch.min() < 0 or batch.max() >= self.n_vocab):
            raise ExportError(f"token ids must lie in [0, {self.n_vocab}); got min {batch.min()} max "
                              f"{batch.max()}. Encode with the tokenizer that was exported with this model.")
        try:
            out: Any = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch)})[0]
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime failed on input of shape {batch.shape} with {self.path}: "
                              f"{' '.join(str(e).split())}. Check the sequence fits the model's context.") from e
        if self.n_vocab is None:
            self.n_vocab = int(out.shape[-1])
        return out[0] if ids.ndim == 1 else out
