import torch

from edgedistill.data.tokens import token_stream
from edgedistill.data.text import load_corpus
from edgedistill.distill.losses import DenseTeacher, LossSpec, kd_loss
from edgedistill.distill.prune import block_importance, choose_layers, depth_pruned_copy
from edgedistill.distill.train import KDConfig, distill
from edgedistill.models import load_causal_lm


def test_depth_pruning_keeps_the_most_important_layers(tiny_model_dir):
    teacher = load_causal_lm(str(tiny_model_dir))
    windows = [[1, 5, 9, 33, 70, 2, 8, 100] * 4]
    imp = block_importance(teacher, windows)
    assert len(imp) == 4 and all(x >= 0 for x in imp)
    keep = choose_layers(imp, 2)
    assert keep == sorted(sorted(range(4), key=lambda i: -imp[i])[:2])
    student = depth_pruned_copy(teacher, keep)
    assert student.config.num_hidden_layers == 2
    for j, i in enumerate(keep):
        a = student.model.layers[j].mlp.down_proj.weight
        b = teacher.model.layers[i].mlp.down_proj.weight
        assert torch.equal(a, b)
    # Keeping every layer reproduces the teacher exactly.
    same = depth_pruned_copy(teacher, [0, 1, 2, 3])
    x = torch.tensor(windows)
    assert torch.allclose(same(x).logits, teacher(x).logits, atol=1e-6)


def _heldout_kl(teacher, student, batch):
    with torch.no_grad():
        h_t = teacher.base_model(input_ids=batch).last_hidden_state
        h_s = student.base_model(input_ids=batch).last_hidden_state
        return kd_loss(h_s, student.get_output_embeddings().weight,
                       DenseTeacher(h_t, teacher.get_output_embeddings().weight), LossSpec()).item()


def test_kd_brings_the_student_closer_to_the_teacher(tiny_model_dir, tiny_tokenizer, tmp_path):
    teacher = load_causal_lm(str(tiny_model_dir))
    student = depth_pruned_copy(teacher, [0, 3])
    corpus = load_corpus("stdlib", max_chars=80_000, seed=3)
    stream = token_stream(tiny_tokenizer, corpus.train)
    held = torch.tensor([w for w in [token_stream(tiny_tokenizer, corpus.heldout)[i:i + 64] for i in range(0, 512, 64)]
                         if len(w) == 64])
    before = _heldout_kl(teacher, student, held)
    cfg = KDConfig(steps=40, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2)
    m = distill(teacher, student, stream, cfg, tmp_path / "s", tokenizer=tiny_tokenizer)
    after = _heldout_kl(teacher, student, held)
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "s" / "config.json").is_file() and m["tokens"] == 40 * 4 * 64
    assert len(m["loss_curve"]) == 40


def test_width_pruning_keeps_active_neurons_and_kv_groups(tiny_model_dir):
    from edgedistill.distill.prune import width_importance, width_pruned_copy
    teacher = load_causal_lm(str(tiny_model_dir))  # 4 heads, 2 KV groups, FFN 128
    windows = [[1, 5, 9, 33, 70, 2, 8, 100] * 4, list(range(3, 35))]
    imp = width_importance(teacher, windows)
    assert len(imp) == 4 and imp[0]["ffn"].shape == (128,) and imp[0]["heads"].shape == (4,)
    student = width_pruned_copy(teacher, imp, ffn_keep=64, kv_groups_keep=1)
    c = student.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 2, 1, 16)
    keep = imp[1]["ffn"].topk(64).indices.sort().values
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight[:, keep])
    x = torch.tensor(windows[:1])
    assert torch.isfinite(student(x).logits).all()
    # Keeping everything reproduces the teacher exactly; a saved copy reloads with its own valid config.
    same = width_pruned_copy(teacher, imp, ffn_keep=128, kv_groups_keep=2)
    assert torch.allclose(same(x).logits, teacher(x).logits, atol=1e-5)


def test_depth_then_width_pruned_student_saves_a_valid_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    from edgedistill.distill.prune import make_depth_pruned_student
    teacher = load_causal_lm(str(tiny_model_dir))
    m = make_depth_pruned_student(teacher, tiny_tokenizer, [list(range(3, 35))], 0.5, tmp_path, width_ratio=0.5)
    s = load_causal_lm(str(tmp_path))
    assert (s.config.num_hidden_layers, s.config.intermediate_size, s.config.num_key_value_heads) == (2, 64, 1)
    assert m["student_params"] == sum(p.numel() for p in s.parameters())
    assert torch.isfinite(s(torch.tensor([[5, 6, 7]])).logits).all()
