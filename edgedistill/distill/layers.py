"""Per-block speed and memory switches for the distillation models: torch.compile and activation checkpointing.

Both act on each transformer block (blocks.decoder_layers) by giving the block an instance `forward`:

* compile: the block's forward goes through torch.compile. Every block of a model runs the same code with
  parameters of the same shapes, so dynamo compiles one graph per (shape, grad mode) and all blocks reuse it:
  seconds of compilation where compiling the whole backbone as one graph unrolls every block (minutes for 32),
  and no graph break at the fused loss's autograd Function, which stays outside. Inductor fuses what eager runs
  as separate kernels over the activations (RMSNorm's fp32 round trip, rotary embedding, SiLU·up, residual adds),
  and its partitioner saves fewer activations for backward.
* compile_mode "reduce-overhead" (distill.cuda_graphs): the compiled blocks replay as CUDA graphs. A step of a
  360M student and a 1.7B teacher launches ~3000 kernels; measured on an H200, Python issuing them one by one left
  the GPU idle ~23% of a step, at times more (step times wandered ±10%). Replayed graphs kept it busy (steady steps).
  The caller marks each step's start (torch.compiler.cudagraph_mark_step_begin) and runs other shapes (generation,
  evaluation) with the patches suspended.
* memory_budget b: the compiled blocks' partitioner saves about a fraction b of the activations it would save,
  recomputing the cheapest (pointwise) ones in backward, instead of whole blocks being recomputed.
* checkpoint_layers = N: the first N blocks keep only their input for backward and run their forward again
  there (non-reentrant torch.utils.checkpoint). N = all is classic gradient checkpointing; a part trades
  exactly as much recomputation as the memory it frees, where all-or-nothing often frees more than needed.

The state dict is untouched (no wrapper modules), and `restore` removes the instance forwards again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..blocks import decoder_layers
from ..errors import DistillError


@dataclass
class LayerPatch:
    layers: list = field(default_factory=list)
    checkpointed: int = 0
    forwards: list = field(default_factory=list)

    def restore(self) -> None:
        for layer in self.layers:
            if "forward" in vars(layer):
                del layer.forward
        self.layers = []
        self.forwards = []

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The blocks' own forwards inside, the patched ones again after: for generation with a KV cache and for
        evaluation, whose shapes would each record CUDA graphs (and compile graphs) of their own."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
        try:
            yield
        finally:
            for layer, fwd in zip(self.layers, self.forwards):
                layer.forward = fwd


def checkpoint_count(setting: bool | int, n_layers: int) -> int:
    """How many blocks `gradient_checkpointing` asks for: True → all, False → none, an int → that many (≤ all)."""
    if isinstance(setting, bool):
        return n_layers if setting else 0
    if setting < 0:
        raise DistillError(f"distill.gradient_checkpointing {setting}: expected true, false or a number of blocks ≥ 0.")
    return min(int(setting), n_layers)


def patch_layers(model, *, compile: bool = False, checkpoint_layers: bool | int = 0,
                 compile_mode: str | None = None, memory_budget: float | None = None) -> LayerPatch:
    """Give each block of `model` a compiled and/or checkpointed forward (see the module docstring).
    `checkpoint_layers` is read as `checkpoint_count` reads distill.gradient_checkpointing. A model without a
    recognised block list is only refused when something is asked for.

    `memory_budget` (compile only, 0 < b < 1): the compiled block's partitioner keeps about that fraction of the
    activations it would save for backward and recomputes the rest, cheapest first (pointwise ops before matmuls:
    torch._functorch.config.activation_memory_budget, set while the block compiles)."""
    if memory_budget is not None and not (compile and 0.0 < memory_budget < 1.0):
        raise DistillError(f"memory_budget {memory_budget}: expected a fraction in (0, 1), with compile on.")
    patch = LayerPatch()
    if not compile and checkpoint_count(checkpoint_layers, 1) == 0:
        return patch
    layers = decoder_layers(model, DistillError, "per-block compilation and checkpointing")
    n_ckpt = checkpoint_count(checkpoint_layers, len(layers))
    for i, layer in enumerate(layers):
        if "forward" in vars(layer):
            raise DistillError(f"block {i} of {type(model).__name__} already has a patched forward; restore it first.")
        if not compile and i >= n_ckpt:
            continue
        fwd = layer.forward  # the class's forward, bound
        if i < n_ckpt:
            fwd = _checkpointed(fwd)
        if compile:
            # Checkpoint inside the compiled region: dynamo traces it and the partitioner recomputes the block in
            # the backward graph. Compiling inside the checkpoint instead replays the compiled forward as an
            # opaque call (saving, then dropping, every activation): measured on an H200 that cost ~1.4 ms per
            # checkpointed block against ~0.3 ms of recomputed matmuls.
            fwd = torch.compile(fwd, mode=compile_mode, fullgraph=False)
            if memory_budget is not None:
                fwd = _with_budget(fwd, memory_budget)
        layer.forward = fwd
        patch.layers.append(layer)
        patch.forwards.append(fwd)
    patch.checkpointed = n_ckpt
    return patch


def _with_budget(fwd, budget: float):
    """The compiled forward with the partitioner's activation budget in force: compilation is lazy (first call,
    and any recompile), so the setting must hold at call time, not when torch.compile is called."""
    import torch._functorch.config as functorch_config

    def forward(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return fwd(*args, **kwargs)
    return forward


def _checkpointed(fwd):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fwd(*args, **kwargs)
        return checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return forward
