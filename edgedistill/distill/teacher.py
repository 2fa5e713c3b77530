"""Where the teacher's targets come from: online forwards, an offline top-k cache, and generation.

Offline cache: the teacher runs once over the training windows and its top-k next-token
log-probs (fp16) and token ids (uint16 when the vocabulary fits, else int32) are stored
with the windows' ids (int32). Bytes per token = 4 + k·(2 + 2) — 132 B at k = 32 for
SmolLM2's 49,152-token vocabulary — against 196,608 B for its full fp32 distribution.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.batches import Batch, next_token_labels
from ..errors import DistillError
from .losses import TopKTeacher


def load_teacher(path: str, quant: str = "none"):
    """The teacher model: fp32 as stored, or (`quant` 'nf4', CUDA only) 4-bit NF4 weights through bitsandbytes with
    bf16 compute, placed on the GPU; its lm_head stays unquantized, so the fused KD loss reads it as usual."""
    from ..models import load_causal_lm
    if quant == "none":
        return load_causal_lm(path)
    if quant != "nf4":
        raise DistillError(f"distill.teacher_quant '{quant}' is unknown; expected 'none' or 'nf4'.")
    if not torch.cuda.is_available():
        raise DistillError("distill.teacher_quant 'nf4' loads the teacher in 4 bits through bitsandbytes, which needs a "
                           "CUDA GPU, and none is visible. Use teacher_quant: none (or teacher_mode: offline) on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DistillError("distill.teacher_quant 'nf4' needs bitsandbytes: pip install -e '.[gpu]'.") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map={"": torch.cuda.current_device()},
                                                dtype=torch.bfloat16).eval()


def place(model, device):
    """model.to(device), except for a bitsandbytes-quantized model, which lives where it was loaded."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model
    return model.to(device)


def cache_bytes_per_token(k: int, vocab: int) -> int:
    return 4 + k * (2 + (2 if vocab <= 65536 else 4))


@torch.no_grad()
def build_teacher_cache(teacher, windows: list[list[int]], k: int, path: str | Path, batch_size: int = 8) -> dict:
    """Run the teacher once over `windows`; write their top-k log-probs and ids to `path` (safetensors)."""
    if not windows:
        raise DistillError("teacher cache: no training windows to score; add data or lower seq_len.")
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0]
    k = min(k, vocab)
    lps, idxs = [], []
    for s in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[s:s + batch_size], device=device)
        h = teacher.base_model(input_ids=ids).last_hidden_state
        lp = torch.log_softmax(head(h).float(), -1)
        top, ix = lp.topk(k, dim=-1)
        lps.append(top.half().cpu())
        ix = ix.cpu()
        idxs.append(ix.to(torch.int32).to(torch.int16) if vocab <= 65536 else ix.to(torch.int32))  # uint16 bits
    tensors = {"input_ids": torch.tensor(windows, dtype=torch.int32), "logprobs": torch.cat(lps),
               "indices": torch.cat(idxs)}
    save_file(tensors, str(path), metadata={"format": "edgedistill-teacher-topk", "k": str(k), "vocab": str(vocab)})
    n_tok = tensors["input_ids"].numel()
    return {"teacher_cache": str(path), "top_k": k, "cached_tokens": n_tok,
            "bytes_per_token": cache_bytes_per_token(k, vocab), "bytes": Path(path).stat().st_size}


class CachedTeacherBatches:
    """Batches of cached windows with their teacher targets, in a seeded order."""

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0):
        raw = load_file(str(path))
        self.ids, self.lp, ix = raw["input_ids"].long(), raw["logprobs"], raw["indices"]
        self.ix = ix.to(torch.int32) & 0xFFFF if ix.dtype == torch.int16 else ix
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> tuple[Batch, TopKTeacher]:
        take = []
        while len(take) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.ids), generator=self.gen).tolist()
            take.append(self.order.pop())
        ids = self.ids[take]
        ones = torch.ones_like(ids, dtype=torch.bool)
        return Batch(ids, torch.ones_like(ids), ones, next_token_labels(ids, ones)), TopKTeacher(self.lp[take], self.ix[take])


@torch.no_grad()
def generate_completions(model, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, max_new_tokens: int,
                         eos_id: int | None, pad_id: int, temperature: float = 1.0) -> Batch:
    """Sample completions (batched, KV cache); the batch trains on the completion tokens only (up to EOS)."""
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_attn, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_k=0, top_p=1.0, use_cache=True,
                             pad_token_id=pad_id, eos_token_id=eos_id)
    finally:
        model.train(was_training)
    P = prompt_ids.shape[1]
    comp = out[:, P:]
    keep = torch.ones_like(comp, dtype=torch.bool)
    if eos_id is not None and comp.numel():
        after_eos = (comp == eos_id).long().cumsum(-1) - (comp == eos_id).long()  # EOS itself is kept
        keep = after_eos == 0
    attn = torch.cat([prompt_attn, keep.long()], dim=1)
    train = torch.zeros_like(out, dtype=torch.bool)
    train[:, P - 1:-1] = keep  # the prediction at P-1 is the first completion token
    ids = torch.where(attn.bool(), out, torch.full_like(out, pad_id))
    return Batch(ids, attn, train, next_token_labels(ids, train))
