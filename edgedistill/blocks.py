"""Where a HF decoder-only model keeps its transformer blocks.

Used by student pruning (distill/) and layer-wise compression (compress/); each
stage wraps the lookup in its own error type and wording.
"""
from __future__ import annotations

import torch

from .errors import EdgeDistillError

BLOCK_LIST_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


def decoder_layers(model, error: type[EdgeDistillError] = EdgeDistillError,
                   purpose: str = "this operation") -> torch.nn.ModuleList:
    """The list of transformer blocks; `error` (naming `purpose`) when the model has none we recognise."""
    for path in BLOCK_LIST_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise error(f"{type(model).__name__}: no block list found (looked for {', '.join(BLOCK_LIST_PATHS)}). "
                f"This architecture is not supported for {purpose}.")


def layers_prefix(model, error: type[EdgeDistillError] = EdgeDistillError, purpose: str = "this operation") -> str:
    """The state-dict prefix of the block list, e.g. 'model.layers.'."""
    layers = decoder_layers(model, error, purpose)
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise error("block list not reachable by name")  # pragma: no cover
