"""Per-block torch.compile and (partial) activation checkpointing of the distillation models (distill/layers.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgedistill.distill.layers import checkpoint_count, patch_layers
from edgedistill.errors import DistillError


def _model(layers=4, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        attn_implementation="sdpa"))


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    h.pow(2).mean().backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of `model`'s backbone."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False).last_hidden_state.sum()
    return sum(seen.values())


def test_partial_checkpointing_saves_fewer_activations_and_keeps_gradients():
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    model = _model()
    ref_h, ref_g = _grads(model, ids)

    full = _saved_bytes(model, ids)
    sizes = []
    for n in (2, 4):
        patch = patch_layers(model, checkpoint_layers=n)
        assert patch.checkpointed == n and len(patch.layers) == n
        h, g = _grads(model, ids)
        torch.testing.assert_close(h, ref_h)
        assert g.keys() == ref_g.keys()
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-5, atol=1e-7)
        sizes.append(_saved_bytes(model, ids))
        patch.restore()
        assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert full > sizes[0] > sizes[1]


def test_compiled_blocks_share_one_graph_and_match_eager():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model = _model()
    ref_h, ref_g = _grads(model, ids)
    patch = patch_layers(model, compile=True, checkpoint_layers=2)
    h, g = _grads(model, ids)
    patch.restore()
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
    # 4 blocks, 2 of them checkpointed: one graph for the checkpointed blocks (the recompute is inside it), one for
    # the others; no recompilation per block.
    assert counters["stats"]["unique_graphs"] == 2


def test_checkpoint_count_and_bad_values():
    assert checkpoint_count(True, 30) == 30 and checkpoint_count(False, 30) == 0 and checkpoint_count(8, 30) == 8
    assert checkpoint_count(99, 30) == 30
    with pytest.raises(DistillError, match="blocks"):
        checkpoint_count(-1, 30)
    model = _model(2)
    patch_layers(model, checkpoint_layers=1)
    with pytest.raises(DistillError, match="already has a patched forward"):
        patch_layers(model, compile=True)


def test_recipe_takes_a_block_count_or_a_switch_and_the_engine_reports_it():
    from edgedistill.distill.train import KDConfig
    from edgedistill.recipe import DistillSpec
    assert DistillSpec.model_validate({"gradient_checkpointing": 6}).gradient_checkpointing == 6
    assert DistillSpec.model_validate({"gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(ValueError, match="number of blocks"):
        DistillSpec.model_validate({"gradient_checkpointing": -2})
    with pytest.raises(DistillError, match="blocks"):
        KDConfig(steps=1, batch_size=1, seq_len=8, lr=1e-3, gradient_checkpointing=-1)


def test_memory_budget_makes_the_compiled_blocks_save_less_and_keeps_gradients():
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    model = _model(2)
    ref_h, ref_g = _grads(model, ids)

    sizes = []
    for budget in (None, 0.05):
        torch._dynamo.reset()  # the budget acts when a block compiles
        patch = patch_layers(model, compile=True, memory_budget=budget)
        h, g = _grads(model, ids)
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
        sizes.append(_saved_bytes(model, ids))
        patch.restore()
    assert sizes[1] < sizes[0]
    with pytest.raises(DistillError, match="fraction"):
        patch_layers(model, compile=True, memory_budget=1.5)
    with pytest.raises(DistillError, match="compile on"):
        patch_layers(model, memory_budget=0.5)


def test_suspended_patches_run_the_blocks_own_forward_and_come_back():
    model = _model(2)
    patch = patch_layers(model, checkpoint_layers=2)
    patched = [layer.forward for layer in model.model.layers]
    with patch.suspended():
        assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert [layer.forward for layer in model.model.layers] == patched
    patch.restore()
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_cuda_graphs_and_memory_budget_need_compile_and_a_fraction():
    from edgedistill.distill.train import KDConfig
    from edgedistill.recipe import DistillSpec
    with pytest.raises(DistillError, match="distill.cuda_graphs .*compile: true"):
        KDConfig(steps=1, batch_size=1, seq_len=8, lr=1e-3, cuda_graphs=True)
    with pytest.raises(DistillError, match="distill.memory_budget .*compile: true"):
        KDConfig(steps=1, batch_size=1, seq_len=8, lr=1e-3, memory_budget=0.5)
    with pytest.raises(DistillError, match="fraction"):
        KDConfig(steps=1, batch_size=1, seq_len=8, lr=1e-3, compile=True, memory_budget=2.0)
    with pytest.raises(ValueError, match="compile: true"):
        DistillSpec.model_validate({"cuda_graphs": True})
    with pytest.raises(ValueError, match="memory_budget"):
        DistillSpec.model_validate({"compile": True, "memory_budget": 1.0})
    spec = DistillSpec.model_validate({"compile": True, "cuda_graphs": True, "memory_budget": 0.5})
    from edgedistill.distill.run import kd_config
    cfg = kd_config(spec)
    assert cfg.cuda_graphs and cfg.memory_budget == 0.5
