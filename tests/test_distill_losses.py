"""The chunked, fused KD losses against plain dense autograd: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from edgedistill.distill.losses import DenseTeacher, LossSpec, TopKTeacher, dense_reference, kd_loss


def _setup(seed=0, n=(2, 37), hs_dim=16, ht_dim=24, vocab=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*n, hs_dim, generator=g, dtype=torch.float64)
    ht = torch.randn(*n, ht_dim, generator=g, dtype=torch.float64)
    ws = torch.randn(vocab, hs_dim, generator=g, dtype=torch.float64) * 0.5
    wt = torch.randn(vocab, ht_dim, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    return hs, ht, ws, wt, b


CASES = [LossSpec("forward_kl"), LossSpec("forward_kl", temperature=2.0), LossSpec("reverse_kl", temperature=1.5),
         LossSpec("jsd", beta=0.5), LossSpec("jsd", beta=0.1, temperature=2.0), LossSpec("jsd", beta=0.0),
         LossSpec("jsd", beta=1.0), LossSpec("forward_kl", ce_weight=0.3), LossSpec("jsd", beta=0.9, ce_weight=0.5)]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.kind}-b{s.beta}-T{s.temperature}-ce{s.ce_weight}")
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_matches_dense_values_and_gradients(spec, masked):
    hs, ht, ws, wt, b = _setup(bias=spec.kind == "reverse_kl")
    labels = torch.randint(0, 50, hs.shape[:2], generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    mask = torch.ones(hs.shape[:2], dtype=torch.bool)
    if masked:
        mask[:, :11] = False  # a prompt
        mask[1, -5:] = False  # padding
    spec = LossSpec(spec.kind, spec.beta, spec.temperature, spec.ce_weight, chunk_tokens=10)
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    b1 = None if b is None else b.clone().requires_grad_()
    ours = kd_loss(hs1, ws1, DenseTeacher(ht, wt), spec, mask=mask, labels=labels, student_bias=b1)
    ours.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    b2 = None if b is None else b.clone().requires_grad_()
    s_logits = F.linear(hs2, ws2, b2)[mask]
    ref = dense_reference(s_logits, F.linear(ht, wt)[mask], spec, labels=labels[mask])
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-8, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-8, atol=1e-12)


def test_gradient_accumulation_with_a_shared_normalizer_equals_one_big_batch():
    hs, ht, ws, wt, _ = _setup(n=(4, 20))
    spec = LossSpec("jsd", beta=0.3, chunk_tokens=16)
    mask = torch.rand(hs.shape[:2], generator=torch.Generator().manual_seed(2)) > 0.3
    w_big = ws.clone().requires_grad_()
    kd_loss(hs, w_big, DenseTeacher(ht, wt), spec, mask=mask).backward()
    w_acc = ws.clone().requires_grad_()
    total = int(mask.sum())
    for i in range(4):  # micro-batches of one sequence, with different token counts
        kd_loss(hs[i:i + 1], w_acc, DenseTeacher(ht[i:i + 1], wt), spec, mask=mask[i:i + 1], normalizer=total).backward()
    torch.testing.assert_close(w_acc.grad, w_big.grad, rtol=1e-10, atol=1e-12)


def test_fp32_chunked_loss_is_close_to_dense():
    torch.manual_seed(0)
    hs = torch.randn(3, 50, 32, requires_grad=True)
    ht, wt = torch.randn(3, 50, 48), torch.randn(200, 48) * 0.2
    ws = (torch.randn(200, 32) * 0.2).requires_grad_()
    spec = LossSpec("reverse_kl", temperature=2.0, chunk_tokens=7)
    loss = kd_loss(hs, ws, DenseTeacher(ht, wt), spec)
    ref = dense_reference(F.linear(hs, ws), F.linear(ht, wt), spec)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(loss, [hs, ws])
    g2 = torch.autograd.grad(ref, [hs, ws])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_top_k_teacher_with_full_k_equals_the_dense_teacher():
    hs, ht, ws, wt, _ = _setup()
    t_logp = F.log_softmax(F.linear(ht, wt), -1)
    lp, ix = t_logp.topk(50, dim=-1)
    for spec in (LossSpec("forward_kl"), LossSpec("jsd", beta=0.5, temperature=2.0)):
        dense = kd_loss(hs, ws, DenseTeacher(ht, wt), spec)
        topk = kd_loss(hs, ws, TopKTeacher(lp, ix), spec)
        torch.testing.assert_close(topk, dense, rtol=1e-6, atol=1e-8)
    # A truncated teacher keeps its top-k probabilities and spreads the rest evenly.
    lp8, ix8 = t_logp.topk(8, dim=-1)
    approx = kd_loss(hs, ws, TopKTeacher(lp8, ix8), LossSpec("reverse_kl"))
    assert torch.isfinite(approx)


def test_under_bf16_autocast_matmuls_run_in_bf16_and_softmax_in_fp32():
    torch.manual_seed(0)
    hs = torch.randn(40, 64, requires_grad=True)
    ht, wt = torch.randn(40, 64), torch.randn(300, 64) * 0.1
    ws = (torch.randn(300, 64) * 0.1).requires_grad_()
    spec = LossSpec("jsd", beta=0.5, chunk_tokens=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(hs, ws, DenseTeacher(ht, wt), spec)
    loss.backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    b = lambda x: x.bfloat16().float()  # noqa: E731
    ref = dense_reference(b(hs.detach()) @ b(ws.detach()).t(), b(ht) @ b(wt).t(), spec)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-4)
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    dense_reference(hs2 @ ws2.t(), ht @ wt.t(), spec).backward()
    torch.testing.assert_close(hs.grad, hs2.grad, rtol=5e-2, atol=5e-4)


@pytest.mark.parametrize("spec", [LossSpec("forward_kl"), LossSpec("jsd", beta=0.3, temperature=2.0, ce_weight=0.2)],
                         ids=["fkl", "jsd-T2-ce"])
def test_compiled_chunk_arithmetic_equals_the_eager_one(spec):
    """LossSpec(compile=True) runs the chunk's softmax arithmetic through torch.compile: same values and gradients
    (fp64 to rounding; a ragged last chunk included)."""
    hs, ht, ws, wt, _ = _setup(n=(2, 23))
    labels = torch.randint(0, 50, hs.shape[:2], generator=torch.Generator().manual_seed(3))
    grads = []
    for compiled in (False, True):
        s = LossSpec(spec.kind, spec.beta, spec.temperature, spec.ce_weight, chunk_tokens=16, compile=compiled)
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = kd_loss(h, w, DenseTeacher(ht, wt), s, labels=labels)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
