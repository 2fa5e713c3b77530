"""Student initialisation by pruning the teacher: depth (whole blocks), then width (FFN neurons, KV groups).

Importance of a block is how much it changes its input on calibration text,
1 − cos(h_in, h_out) averaged over tokens (the "block influence" of ShortGPT).
Blocks that barely rotate the residual stream are dropped first.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import blocks
from ..errors import DistillError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a HF decoder-only model."""
    return blocks.decoder_layers(model, DistillError, "pruning")


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
    _calibrate(model, windows, handles)
    return (scores / counts.clamp(min=1)).tolist()


def _calibrate(model, windows: list[list[int]], handles: list) -> None:
    """Run the calibration windows through `model` (hooks collect what they need), then remove the hooks."""
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([w], device=device))
    finally:
        for h in handles:
            h.remove()


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
    prefix = layers_prefix(model)
    new_sd = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            idx, rest = k[len(prefix):].split(".", 1)
            if int(idx) in keep_layers:
                new_sd[f"{prefix}{keep_layers.index(int(idx))}.{rest}"] = v.clone()
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


def layers_prefix(model) -> str:
    """The state-dict prefix of the block list, e.g. 'model.layers.'."""
    return blocks.layers_prefix(model, DistillError, "pruning")


def make_depth_pruned_student(teacher, tokenizer, windows: list[list[int]], keep_ratio: float, out_dir: Path,
                              width_ratio: float = 1.0) -> dict:
    """Depth pruning, then (width_ratio < 1) width pruning of FFN neurons and KV groups, measured on the kept blocks."""
    importance = block_importance(teacher, windows)
    n = len(importance)
    keep = choose_layers(importance, max(1, int(n * keep_ratio)))
    student = depth_pruned_copy(teacher, keep)
    width = {}
    if width_ratio < 1.0:
        cfg = student.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        ffn_keep = max(1, int(cfg.intermediate_size * width_ratio))
        kv_keep = max(1, round(n_kv * width_ratio))
        student = width_pruned_copy(student, width_importance(student, windows), ffn_keep, kv_keep)
        width = {"width_ratio": width_ratio, "intermediate_size": ffn_keep, "num_key_value_heads": kv_keep,
                 "num_attention_heads": student.config.num_attention_heads}
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"teacher_layers": n, "student_layers": len(keep), "kept_layers": keep,
            "importance": [round(x, 6) for x in importance], **width,
            "student_params": sum(p.numel() for p in student.parameters())}


# ------------------------------------------------------------------ width (Minitron-style)
@torch.no_grad()
def width_importance(model, windows: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Per block: mean |activation| of each FFN neuron (the input of down_proj) and the mean L2 norm of each
    attention head's output (the input of o_proj), on calibration text (Minitron's activation importance)."""
    layers = decoder_layers(model)
    head_dim = _head_dim(model.config)
    stats = [{"ffn": None, "heads": None, "n": 0} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if mlp is None or attn is None or not hasattr(mlp, "down_proj") or not hasattr(attn, "o_proj"):
            raise DistillError(f"block {i} has no mlp.down_proj / self_attn.o_proj: width pruning supports "
                               "Llama-style blocks only.")

        def ffn_hook(mod, args, i=i):
            a = args[0].flatten(0, -2).double().abs().sum(0)
            stats[i]["ffn"] = a if stats[i]["ffn"] is None else stats[i]["ffn"] + a
            stats[i]["n"] += args[0].flatten(0, -2).shape[0]

        def head_hook(mod, args, i=i):
            x = args[0].flatten(0, -2).double()
            h = x.reshape(x.shape[0], -1, head_dim).norm(dim=-1).sum(0)
            stats[i]["heads"] = h if stats[i]["heads"] is None else stats[i]["heads"] + h

        handles += [mlp.down_proj.register_forward_pre_hook(ffn_hook), attn.o_proj.register_forward_pre_hook(head_hook)]
    _calibrate(model, windows, handles)
    return [{"ffn": s["ffn"] / max(s["n"], 1), "heads": s["heads"] / max(s["n"], 1)} for s in stats]


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def width_pruned_copy(model, importance: list[dict[str, torch.Tensor]], ffn_keep: int, kv_groups_keep: int):
    """A smaller dense model: each block keeps its `ffn_keep` most active FFN neurons and its `kv_groups_keep`
    most important KV groups (with all their query heads, so grouped-query attention stays consistent)."""
    cfg = copy.deepcopy(model.config)
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    group = n_heads // n_kv
    if not 1 <= ffn_keep <= cfg.intermediate_size or not 1 <= kv_groups_keep <= n_kv:
        raise DistillError(f"width pruning: keep 1..{cfg.intermediate_size} FFN neurons and 1..{n_kv} KV groups "
                           f"(asked {ffn_keep} and {kv_groups_keep}).")
    hd = _head_dim(cfg)
    cfg.head_dim = hd  # no longer hidden_size / heads once heads are dropped
    cfg.intermediate_size = ffn_keep
    cfg.num_attention_heads, cfg.num_key_value_heads = kv_groups_keep * group, kv_groups_keep
    student = type(model)(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = layers_prefix(model)
    for i, imp in enumerate(importance):
        neurons = imp["ffn"].topk(ffn_keep).indices.sort().values
        groups = imp["heads"].reshape(n_kv, group).sum(-1).topk(kv_groups_keep).indices.sort().values
        heads = (groups[:, None] * group + torch.arange(group)).flatten()
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
        p = f"{prefix}{i}."
        for name, rows in (("mlp.gate_proj", neurons), ("mlp.up_proj", neurons), ("self_attn.q_proj", q_rows),
                           ("self_attn.k_proj", kv_rows), ("self_attn.v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                if f"{p}{name}.{kind}" in sd:
                    sd[f"{p}{name}.{kind}"] = sd[f"{p}{name}.{kind}"][rows].contiguous()
        for name, cols in (("mlp.down_proj", neurons), ("self_attn.o_proj", q_rows)):
            sd[f"{p}{name}.weight"] = sd[f"{p}{name}.weight"][:, cols].contiguous()
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise DistillError(f"width pruning produced an inconsistent state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return student.eval()
