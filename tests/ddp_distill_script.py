"""Run by tests/test_distill_ddp.py: the same tiny distillation, single-process or under torchrun (gloo, CPU)."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgedistill.data.batches import Batch, next_token_labels  # noqa: E402
from edgedistill.distill.prune import depth_pruned_copy  # noqa: E402
from edgedistill.distill.train import KDConfig, distill  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 4


class ShardedBatches:
    """The same global batches in every run; rank r of w gets its contiguous share of rows."""

    def __init__(self, rank: int, world: int):
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
        self.rank, self.world, self.i = rank, world, 0

    def next_batch(self) -> Batch:
        per = GLOBAL_BATCH // self.world
        ids = self.batches[self.i][self.rank * per:(self.rank + 1) * per]
        self.i += 1
        train = torch.ones_like(ids, dtype=torch.bool)
        train[:, : SEQ // 4] = False  # a "prompt": uneven masks would expose a wrong normaliser
        return Batch(ids, torch.ones_like(ids), train, next_token_labels(ids, train))


def main(out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg)
    student = depth_pruned_copy(teacher, [1])
    # fp32: the check is that DDP does the same arithmetic as one process, to fp32 rounding (bf16 rounding of
    # differently sized batches would hide a wrong gradient average under its noise)
    kd = KDConfig(steps=STEPS, batch_size=GLOBAL_BATCH // world, seq_len=SEQ, lr=1e-2, precision="fp32")
    m = distill(teacher, student, ShardedBatches(rank, world), kd, Path(out).parent / f"student-{world}")
    if rank == 0:
        Path(out).write_text(json.dumps({"loss_curve": m["loss_curve"], "world": m["world_size"],
                                         "weights": {n: p.detach().flatten()[:64].tolist()
                                                     for n, p in student.named_parameters()}}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
