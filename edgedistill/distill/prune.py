"""Student initialisation by depth pruning: keep the teacher's most important blocks.

Importance of a block is how much it changes its input on calibration text,
1 − cos(h_in, h_out) averaged over tokens (the "block influence" of ShortGPT).
Blocks that barely rotate the residual stream are dropped first.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import DistillError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a HF decoder-only model."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise DistillError(f"{type(model).__name__}: no block list found (looked for model.layers, transformer.h, "
                       "model.decoder.layers, gpt_neox.layers). This architecture is not supported for pruning.")


@torch.no_grad()
def block_importance(model, windows: list[list[int]]) -> list[float]:
    layers = decoder_layers(model)
    scores = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.flatten(0, -2).double(), h_out.flatten(0, -2).double(), dim=-1)
            scores[i] += (1.0 - cos).sum()
            counts[i] += cos.numel()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for w in windows:
            model(torch.tensor([w], device=device))
    finally:
        for h in handles:
            h.remove()
    return (scores / counts.clamp(min=1)).tolist()


def choose_layers(importance: list[float], keep: int) -> list[int]:
    if not 1 <= keep <= len(importance):
        raise DistillError(f"cannot keep {keep} of {len(importance)} layers; student.keep_ratio must leave at least one.")
    ranked = sorted(range(len(importance)), key=lambda i: importance[i], reverse=True)
    return sorted(ranked[:keep])


def depth_pruned_copy(model, keep_layers: list[int]):
    """A new model holding only `keep_layers` of `model`'s blocks, with a consistent config."""
    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(keep_layers)
    for attr in ("layer_types", "sliding_window_pattern_list"):
        if isinstance(getattr(cfg, attr, None), list) and len(getattr(cfg, attr)) == n:
            setattr(cfg, attr, [getattr(cfg, attr)[i] for i in keep_layers])
    student = type(model)(cfg)
    sd = model.state_dict()
    layers_prefix = _layers_prefix(model)
    new_sd = {}
    for k, v in sd.items():
        if k.startswith(layers_prefix):
            idx, rest = k[len(layers_prefix):].split(".", 1)
            if int(idx) in keep_layers:
                new_sd[f"{layers_prefix}{keep_layers.index(int(idx))}.{rest}"] = v.clone()
        else:
            new_sd[k] = v.clone()
    missing, unexpected = student.load_state_dict(new_sd, strict=False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise DistillError(f"depth pruning produced an inconsistent state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for i, layer in enumerate(decoder_layers(student)):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = i
    return student.eval()


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise DistillError("block list not reachable by name")  # pragma: no cover


def make_depth_pruned_student(teacher, tokenizer, windows: list[list[int]], keep_ratio: float, out_dir: Path) -> dict:
    importance = block_importance(teacher, windows)
    n = len(importance)
    keep = choose_layers(importance, max(1, int(n * keep_ratio)))
    student = depth_pruned_copy(teacher, keep)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"teacher_layers": n, "student_layers": len(keep), "kept_layers": keep,
            "importance": [round(x, 6) for x in importance],
            "student_params": sum(p.numel() for p in student.parameters())}
