"""The distillation engine on tiny models: QAT bit-exactness, offline teacher, chat masking,
on-policy / sequence-level KD, NaN stop, resume."""
import json

import gguf
import numpy as np
import pytest
import torch

from edgedistill.compress import grids
from edgedistill.compress.rtn import CODES_FILE, load_codes
from edgedistill.data.batches import ChatBatches, PromptBatches, chat_tokens
from edgedistill.data.text import load_corpus
from edgedistill.data.tokens import token_stream, windows
from edgedistill.distill import qat
from edgedistill.distill.prune import depth_pruned_copy
from edgedistill.distill.teacher import CachedTeacherBatches, build_teacher_cache, cache_bytes_per_token
from edgedistill.distill.train import KDConfig, distill
from edgedistill.errors import DataError, DistillError
from edgedistill.export.gguf import permute_rows, write_gguf
from edgedistill.models import load_causal_lm

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}


@pytest.fixture(scope="module")
def stream(tiny_tokenizer):
    return token_stream(tiny_tokenizer, load_corpus("stdlib", max_chars=60_000, seed=3).train)


def _pair(tiny_model_dir):
    teacher = load_causal_lm(str(tiny_model_dir))
    return teacher, depth_pruned_copy(teacher, [0, 3])


def _gguf_name(n: str) -> str:
    if n == "model.embed_tokens.weight":
        return "token_embd.weight"
    i, rest = n.split(".")[2], ".".join(n.split(".")[3:-1])
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}[rest]
    return f"blk.{i}.{short}.weight"


@pytest.mark.parametrize("grid", ["q8_0", "q4_0", "q4_1"])
def test_quantize_aware_student_exports_bit_identical_weights(grid, tiny_model_dir, tiny_tokenizer, stream, tmp_path,
                                                             monkeypatch):
    teacher, student = _pair(tiny_model_dir)
    used = {}
    original = qat.export_codes

    def spy(model, g):  # the fake-quantized weights the forward pass computes with, just before export
        used.update({n: t.detach().clone() for n, t in qat.fake_quantized_params(model, g).items()})
        return original(model, g)

    monkeypatch.setattr(qat, "export_codes", spy)
    cfg = KDConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3, quantize_aware=grid)
    out = tmp_path / "s"
    m = distill(teacher, student, stream, cfg, out, tokenizer=tiny_tokenizer)
    assert m["quantize_aware"]["tensors"] == len(used) > 0
    codes = load_codes(out / "qat" / CODES_FILE)
    path = tmp_path / "s.gguf"
    write_gguf(out, path, grid, codes=codes)
    heads = {"self_attn.q_proj": student.config.num_attention_heads,
             "self_attn.k_proj": student.config.num_key_value_heads}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for n, w in used.items():
        t = tensors[_gguf_name(n)]
        assert t.tensor_type == GGML[grid], n
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = w.float().numpy()
        rest = ".".join(n.split(".")[3:-1])
        if rest in heads:
            want = permute_rows(want, heads[rest])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), n
    # The saved student holds the same values, so torch evaluates exactly what the GGUF holds.
    saved = load_causal_lm(str(out))
    for n, w in used.items():
        assert torch.equal(dict(saved.named_parameters())[n], w), n


def test_straight_through_gradient_reaches_the_latent_weight():
    w = torch.randn(4, 64, requires_grad=True)
    q = qat._StraightThrough.apply(w, "q4_0")
    assert torch.equal(q, grids.fake_quantize(w.detach(), "q4_0"))
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(4, 64))


def test_offline_top_k_cache_trains_like_the_online_teacher(tiny_model_dir, tiny_tokenizer, stream, tmp_path):
    teacher, student = _pair(tiny_model_dir)
    wins = windows(stream, 32, 24)
    info = build_teacher_cache(teacher, wins, k=16, path=tmp_path / "cache.safetensors")
    assert info["bytes_per_token"] == 4 + 16 * 4 == cache_bytes_per_token(16, 1024)
    assert info["bytes"] < info["cached_tokens"] * info["bytes_per_token"] + 4096
    data = CachedTeacherBatches(tmp_path / "cache.safetensors", batch_size=4)
    batch, targets = data.next_batch()
    with torch.no_grad():
        lp = torch.log_softmax(teacher(batch.input_ids).logits, -1)
    top = lp.topk(16, -1)
    assert torch.equal(targets.indices.long(), top.indices)
    torch.testing.assert_close(targets.logprobs.float(), top.values, atol=2e-3, rtol=1e-3)
    m = distill(teacher, student, data, KDConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3), tmp_path / "s")
    assert m["loss_last"] < m["loss_first"]


def test_cache_indices_round_trip_above_int16(tmp_path):
    class Fake(torch.nn.Module):  # a "teacher" whose best tokens sit above 32767
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 40000, bias=False)
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.weight[39999, 0] = 5.0
                self.head.weight[33000, 0] = 4.0
            self.base_model = lambda input_ids: type("O", (), {"last_hidden_state": torch.ones(*input_ids.shape, 8)})

        def get_output_embeddings(self):
            return self.head

    build_teacher_cache(Fake(), [[1, 2, 3]], k=2, path=tmp_path / "c.safetensors")
    _, t = CachedTeacherBatches(tmp_path / "c.safetensors", batch_size=1).next_batch()
    assert t.indices[0, 0].tolist() == [39999, 33000]


def test_chat_jsonl_trains_on_assistant_tokens_only(tiny_tokenizer, tmp_path):
    conv = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Five, surely not."}]
    ids, wrote = chat_tokens(tiny_tokenizer, conv)
    text_of = lambda keep: tiny_tokenizer.decode([t for t, w in zip(ids, wrote) if w == keep])  # noqa: E731
    assert "Four." in text_of(True) and "Five, surely not." in text_of(True)
    assert "two plus two" not in text_of(True) and "And three" not in text_of(True)
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"messages": conv[:k]}) for k in (2, 4)) + "\n")
    b = ChatBatches(p, tiny_tokenizer, seq_len=256, batch_size=2).next_batch()
    for row in range(2):
        n = int(b.attention_mask[row].sum())
        trained_targets = b.input_ids[row, 1:n][b.loss_mask[row, :n - 1]].tolist()
        assert "Four." in tiny_tokenizer.decode(trained_targets)
        assert "two plus two" not in tiny_tokenizer.decode(trained_targets)
        assert not b.loss_mask[row, n - 1:].any()  # nothing trained past the end (padding)
        assert torch.equal(b.labels[row, :n - 1][b.loss_mask[row, :n - 1]], torch.tensor(trained_targets))


def test_bad_data_is_a_clear_error(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ChatBatches(tmp_path / "nope.jsonl", tiny_tokenizer, 64, 2)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        PromptBatches(tmp_path / "empty.jsonl", tiny_tokenizer, 2)
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    (tmp_path / "long.jsonl").write_text(json.dumps({"messages": long}) + "\n")
    with pytest.raises(DataError, match="longer than the model's context"):
        ChatBatches(tmp_path / "long.jsonl", tiny_tokenizer, 64, 2, context=128)


def test_on_policy_and_sequence_level_kd_train_on_generated_completions(tiny_model_dir, tiny_tokenizer, tmp_path):
    teacher, student = _pair(tiny_model_dir)
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"prompt": "def add(a, b):"},
                                                    {"messages": [{"role": "user", "content": "Say hi"}]},
                                                    {"prompt": "import os\n"}]) + "\n")
    prompts = PromptBatches(p, tiny_tokenizer, batch_size=2)
    stream = list(range(5, 900)) * 2
    cfg = KDConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3, on_policy_fraction=0.5, sequence_kd_fraction=0.5,
                   max_new_tokens=8, loss=None)
    m = distill(teacher, student, stream, cfg, tmp_path / "s", tokenizer=tiny_tokenizer, prompts=prompts)
    assert len(m["loss_curve"]) == 6 and all(np.isfinite(m["loss_curve"]))
    # Every step generated: tokens counted are prompt + completion, not the 32-token text windows.
    assert m["tokens"] != 6 * 2 * 32


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_model_dir, tiny_tokenizer, stream, tmp_path):
    teacher, student = _pair(tiny_model_dir)

    class PoisonAfter:  # batches turn bad at step 3: the teacher's targets become NaN
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def next_batch(self):
            self.n += 1
            if self.n == 4:
                with torch.no_grad():
                    teacher.get_output_embeddings().weight.fill_(float("nan"))
            return self.inner.next_batch()

    from edgedistill.data.batches import TextBatches
    cfg = KDConfig(steps=6, batch_size=2, seq_len=32, lr=1e-3, checkpoint_every=2, gradient_checkpointing=1)
    with pytest.raises(DistillError, match=r"at step 3.*last good checkpoint \(step 2\)"):
        distill(teacher, student, PoisonAfter(TextBatches(stream, 32, 2)), cfg, tmp_path / "s",
                checkpoint_dir=tmp_path / "ck")
    assert torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "s").exists()
    # the checkpointed block's patched forward is gone again: the caller's model is as it was
    assert not any("forward" in vars(m) for m in student.modules())


def test_resume_from_checkpoint_reaches_the_same_weights(tiny_model_dir, stream, tmp_path):
    cfg = KDConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3, checkpoint_every=2)
    teacher, full = _pair(tiny_model_dir)
    distill(teacher, full, stream, cfg, tmp_path / "full")

    from edgedistill.data.batches import TextBatches

    class Crash(TextBatches):
        n = 0

        def next_batch(self):
            Crash.n += 1
            if Crash.n == 3:
                raise KeyboardInterrupt
            return super().next_batch()

    teacher, part = _pair(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, part, Crash(stream, 32, 2), cfg, tmp_path / "part", checkpoint_dir=tmp_path / "ck")
    teacher, resumed = _pair(tiny_model_dir)
    m = distill(teacher, resumed, TextBatches(stream, 32, 2), cfg, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck")
    assert m["resumed_from"] == 2 and len(m["loss_curve"]) == 2
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_cli_distill_with_recipe_fields(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from edgedistill.cli import app
    (tmp_path / "text").mkdir()
    for i, doc in enumerate(load_corpus("stdlib", max_chars=40_000, seed=5).train):
        (tmp_path / "text" / f"{i}.txt").write_text(doc)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    args = ["distill", "--teacher", str(tiny_model_dir), "--data", str(tmp_path / "text"), "--out", str(tmp_path / "s"),
            "--loss", "jsd", "--beta", "0.5", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--on-policy-fraction", "0.5", "--prompts", str(prompts), "--max-new-tokens", "4",
            "--quantize-aware", "q4_0", "--eval-every", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    assert summary["loss"] == "jsd" and summary["steps"] == 3 and summary["quantize_aware"]["grid"] == "q4_0"
    assert summary["final_eval"]["heldout_ppl"] > 1
    assert (tmp_path / "s" / "qat" / CODES_FILE).is_file() and not (tmp_path / "s.work").exists()
    bad = CliRunner().invoke(app, args[:7] + ["--beta", "2"])
    assert bad.exit_code == 2 and "--beta" in bad.output and "Traceback" not in bad.output


def test_gpu_code_paths_run_on_cpu(tiny_model_dir, tiny_tokenizer, stream, tmp_path):
    """bf16 autocast, gradient checkpointing and grad accumulation through the same loop (CPU)."""
    teacher, student = _pair(tiny_model_dir)
    cfg = KDConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, precision="bf16", gradient_checkpointing=True,
                   grad_accum=2)
    m = distill(teacher, student, stream, cfg, tmp_path / "s")
    assert m["precision"] == "bf16" and all(np.isfinite(m["loss_curve"]))
    assert m["tokens"] == 3 * 2 * 2 * 32
    assert not student.is_gradient_checkpointing


@pytest.mark.slow
def test_torch_compile_path_runs_on_cpu(tiny_model_dir, stream, tmp_path):
    teacher, student = _pair(tiny_model_dir)
    m = distill(teacher, student, stream, KDConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, compile=True), tmp_path / "s")
    assert all(np.isfinite(m["loss_curve"]))
    # the GPU switches are accepted on CPU: a memory budget acts, CUDA graphs are off (and reported so)
    torch._dynamo.reset()
    cfg = KDConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, compile=True, cuda_graphs=True, memory_budget=0.5,
                   on_policy_fraction=0.5, max_new_tokens=8)
    m = distill(teacher, student, stream, cfg, tmp_path / "s2", heldout=None)
    assert all(np.isfinite(m["loss_curve"])) and m["cuda_graphs"] is False and m["memory_budget"] == 0.5


@pytest.mark.slow
def test_real_teacher_offline_cache_jsd(tmp_path):
    from edgedistill.models import load_tokenizer, resolve_model
    teacher_dir = resolve_model("smollm2-135m-instruct")
    teacher, tok = load_causal_lm(teacher_dir), load_tokenizer(teacher_dir)
    student = depth_pruned_copy(teacher, list(range(0, 30, 2)))
    stream = token_stream(tok, load_corpus("stdlib", max_chars=100_000, seed=0).train, max_tokens=20_000)
    info = build_teacher_cache(teacher, windows(stream, 64, 32), k=32, path=tmp_path / "c.safetensors")
    assert info["bytes_per_token"] == 132  # 49,152-token vocabulary: uint16 ids
    data = CachedTeacherBatches(tmp_path / "c.safetensors", batch_size=4)
    from edgedistill.distill.losses import LossSpec
    m = distill(teacher, student, data, KDConfig(steps=8, batch_size=4, seq_len=64, lr=1e-3,
                                                 loss=LossSpec("jsd", beta=0.5)), tmp_path / "s")
    assert m["loss_last"] < m["loss_first"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; a GPU would load the 4-bit teacher")
def test_4bit_teacher_is_refused_clearly_on_cpu(tiny_model_dir):
    from edgedistill.distill.teacher import load_teacher
    from edgedistill.recipe import parse_recipe
    assert parse_recipe({"distill": {"teacher_quant": "nf4"}}).distill.teacher_quant == "nf4"
    with pytest.raises(DistillError, match="teacher_quant 'nf4'.*CUDA GPU"):
        load_teacher(str(tiny_model_dir), "nf4")
    assert load_teacher(str(tiny_model_dir), "none").dtype == torch.float32
