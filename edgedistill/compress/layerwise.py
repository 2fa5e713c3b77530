"""Layer-wise calibration for HF decoder models: one block on the accelerator at a time.

The inputs of block 0 (hidden states plus whatever the model passes each block:
rotary position embeddings, attention masks, position ids) are captured with a
hook; then, per block: run it on the calibration inputs to collect one fp32
Hessian per *input* (linears fed the same tensor — q/k/v, gate/up — share it),
compress its linears, and run the compressed block to make the next block's
inputs, so later blocks calibrate on the errors earlier ones left.

The forward passes run in `forward_dtype` (bfloat16 by default, like the
reference's fp16 model); Hessians and the weights being compressed stay fp32.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..blocks import decoder_layers
from ..errors import CompressError
from ..progress import progress_bar
from .attention import calibration_attention
from .rmsnorm import calibration_rms_norms
from .obs import sweep_threads

UNSUPPORTED_WEIGHT_MODULES = ("Conv1D", "Conv1d", "Conv2d", "Embedding", "EmbeddingBag")


class _Captured(Exception):
    pass


def decoder_blocks(model) -> torch.nn.ModuleList:
    return decoder_layers(model, CompressError, "compression")


def _to(obj: Any, device, dtype) -> Any:
    """Move tensors (nested in tuples/lists/dicts) to device; floating ones also to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering the current block, and the block's other kwargs."""
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_block_inputs(model, windows: list[list[int]], batch_size: int, device, dtype) -> BlockInputs:
    """Run the model up to its first block on every batch of windows; keep what block 0 receives."""
    blocks = decoder_blocks(model)
    hidden, kwargs = [], []

    def grab(module, args, kw):
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        for k in ("past_key_values", "past_key_value"):
            kw.pop(k, None)
        kw["use_cache"] = False
        hidden.append(h.to(device, dtype))
        kwargs.append(_to(kw, device, dtype))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model_device = next(model.parameters()).device
        for b in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[b:b + batch_size], device=model_device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(hidden) != (len(windows) + batch_size - 1) // batch_size:
        raise CompressError(f"{type(model).__name__}: block 0 was not reached on every calibration batch; the model "
                            f"does not run its blocks from model.layers.")
    return BlockInputs(hidden, kwargs)


def _run_block(block, inputs: BlockInputs, keep_outputs: bool) -> list[torch.Tensor]:
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        out = block(h, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if keep_outputs:
            outs.append(out)
    return outs


def block_linears(block, name: str) -> dict[str, torch.nn.Linear]:
    """The block's nn.Linear modules by qualified name; a weight module of another kind is an error."""
    out = {}
    for n, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[n] = mod
        elif type(mod).__name__ in UNSUPPORTED_WEIGHT_MODULES:
            raise CompressError(f"layer '{name}.{n}' is a {type(mod).__name__}; compression handles nn.Linear "
                                f"weights only (Llama, Qwen2, Mistral, Phi-3 style blocks).")
    if not out:
        raise CompressError(f"block '{name}' holds no nn.Linear layers to compress.")
    return out


@dataclass
class InputGroup:
    """Linears that read the same input tensor, and the Hessian of that input."""
    names: list[str]
    hessian: Any = None
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def _pre_hooks(linears: dict[str, torch.nn.Linear], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """A forward pre-hook `make_hook(name)` on every linear while the block runs."""
    handles = [mod.register_forward_pre_hook(make_hook(n)) for n, mod in linears.items()]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def _check_all_ran(linears: dict[str, torch.nn.Linear], ran) -> None:
    missing = sorted(set(linears) - set(ran))
    if missing:
        raise CompressError(f"linears {missing} never ran in the block's forward pass; they cannot be calibrated.")


@torch.no_grad()
def collect_hessians(block, inputs: BlockInputs, linears: dict[str, torch.nn.Linear], device) -> list[InputGroup]:
    """One pass over the calibration batches; linears fed the identical tensor are grouped on one Hessian."""
    from .obs import HessianAccumulator  # noqa: F401 (kept local: obs imports nothing from here)

    order: list[str] = []
    seen: dict[str, torch.Tensor] = {}  # first batch's inputs, kept alive so identity means "same tensor"
    first_batch = [True]
    groups: dict[str, InputGroup] = {}
    leader: dict[str, str] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            if first_batch[0]:
                order.append(name)
                seen[name] = x
                same = [n for n in order[:-1] if seen[n] is x]
                if same:
                    leader[name] = leader[same[0]]
                    groups[leader[name]].names.append(name)
                    return
                leader[name] = name
                groups[name] = InputGroup([name], HessianAccumulator(x.shape[-1], device))
            if leader[name] == name:
                groups[name].hessian.add(x)
            if not first_batch[0] and name == order[-1]:
                raise _Captured  # the rest of the block (down_proj's product, the residual) feeds no Hessian
        return fn

    with _pre_hooks(linears, hook):
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                out = block(h, **kw)
                del out
            except _Captured:
                pass
            first_batch[0] = False
            seen.clear()
    _check_all_ran(linears, order)
    return list(groups.values())


CompressGroup = Callable[[int, InputGroup, dict[str, torch.nn.Linear]], dict]


@torch.no_grad()
def compress_layerwise(model, windows: list[list[int]], compress_group: CompressGroup, *, device="cpu",
                       forward_dtype=torch.bfloat16, batch_size: int = 8, label: str = "compress",
                       cpu_threads: int = 1, one_pass: bool = False) -> dict:
    """Calibrate and compress every block in turn. `compress_group(block_index, group, linears)` rewrites the
    fp32 weights of the group's linears in place and returns per-linear metrics.

    On CPU everything runs on `cpu_threads` threads. One is the default because on the shared 2-core build
    machine a 2-thread pool made block forwards 2.5-6× and LAPACK factorisations up to 100× slower (threads
    spin at barriers while the other core is busy); on an idle machine pass the core count.

    `one_pass` ("true sequential"): each block runs once, on all calibration windows as one batch, and each
    group of linears is compressed when the forward reaches it (a pre-hook), so later linears see the inputs
    the compressed earlier ones make and the block's output is already the compressed block's: one block
    forward instead of two. Only for methods that keep the weights' shapes (SparseGPT, GPTQ)."""
    device = torch.device(device)
    with sweep_threads(device, cpu_threads):
        if one_pass:
            return _compress_one_pass(model, windows, compress_group, device, forward_dtype, label)
        return _compress_layerwise(model, windows, compress_group, device, forward_dtype, batch_size, label)


def _one_thread_each(compress_group: CompressGroup, i: int, groups: list[InputGroup], linears,
                     workers: int) -> list[dict]:
    """The groups compressed side by side on `workers` threads of one intra-op thread each (largest first, so the
    short ones fill in behind it); results in the groups' order."""
    from concurrent.futures import ThreadPoolExecutor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            order = sorted(range(len(groups)), key=lambda k: -sum(linears[n].weight.numel() for n in groups[k].names))
            futures = {k: pool.submit(compress_group, i, groups[k], linears) for k in order}
            return [futures[k].result() for k in range(len(groups))]
    finally:
        torch.set_num_threads(threads)


def _compress_groups(compress_group: CompressGroup, i: int, groups: list[InputGroup], linears, device) -> list[dict]:
    """Each group's compression, in order. On a multi-thread CPU pool the groups run side by side, one thread each:
    a sweep is many small ops that a shared intra-op pool slows down (see obs.sweep_threads), while independent
    single-threaded sweeps (their kernels release the GIL) fill the cores."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(groups) < 2:
        return [compress_group(i, g, linears) for g in groups]
    return _one_thread_each(compress_group, i, groups, linears, min(threads, len(groups)))


def _walk_blocks(model, windows, batch_size, device, forward_dtype, label, timings: dict):
    """Capture block 0's inputs (in batches of `batch_size` windows), then per block: yield (index, count, block,
    its copy in `forward_dtype`, the inputs) with the block on `device`; it goes home when the caller moves on."""
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs = capture_block_inputs(model, windows, batch_size, device, forward_dtype)
    timings.update(capture_s=time.perf_counter() - t0, hessian_s=0.0, sweep_s=0.0, forward_s=0.0)
    with progress_bar(label, total=len(blocks)) as bar:
        for i, block in enumerate(blocks):
            home = next(block.parameters()).device
            block.to(device)
            # on CPU, causal attention in query blocks (compress/attention.py; copies of the block inherit it) and the
            # runner's RMSNorms in one pass (compress/rmsnorm.py)
            cpu = device.type == "cpu"
            with calibration_attention(block) if cpu else contextlib.nullcontext():
                runner = copy.deepcopy(block).to(forward_dtype) if forward_dtype != torch.float32 else block
                with calibration_rms_norms(runner) if cpu else contextlib.nullcontext():
                    yield i, len(blocks), block, runner, inputs
            del runner
            block.to(home)
            bar.advance()


def _compress_layerwise(model, windows, compress_group, device, forward_dtype, batch_size, label) -> dict:
    timings: dict[str, float] = {}
    per_layer: dict[str, dict] = {}
    for i, n_blocks, block, runner, inputs in _walk_blocks(model, windows, batch_size, device, forward_dtype, label,
                                                            timings):
        linears = block_linears(block, f"layers.{i}")
        t = time.perf_counter()
        groups = collect_hessians(runner, inputs, block_linears(runner, f"layers.{i}"), device)
        timings["hessian_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for g, metrics in zip(groups, _compress_groups(compress_group, i, groups, linears, device)):
            for name, m in metrics.items():
                per_layer[f"layers.{i}.{name}"] = m
            del g.hessian
        timings["sweep_s"] += time.perf_counter() - t
        t = time.perf_counter()
        if i + 1 < n_blocks:  # the last block's outputs feed no Hessian
            # the compressed weights, in the forward dtype
            runner = copy.deepcopy(block).to(forward_dtype) if runner is not block else block
            inputs.hidden = _run_block(runner, inputs, keep_outputs=True)
        del runner
        timings["forward_s"] += time.perf_counter() - t
    return {"layers": per_layer, "timings_s": {k: round(v, 2) for k, v in timings.items()}}


def discover_groups(block, inputs: BlockInputs, linears: dict[str, torch.nn.Linear]) -> list[list[str]]:
    """The block's linears in call order, grouped by the input tensor they read (q/k/v, gate/up): one forward on the
    first calibration batch, stopped when every linear has been called."""
    order: list[str] = []
    seen: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            order.append(name)
            same = next((n for n in order[:-1] if seen[n] is x), None)
            seen[name] = x
            if same is None:
                groups[name] = [name]
            else:
                lead = next(k for k, v in groups.items() if same in v)
                groups[lead].append(name)
            if len(order) == len(linears):
                raise _Captured
        return fn

    with _pre_hooks(linears, hook):
        try:
            block(inputs.hidden[0], **inputs.kwargs[0])
        except _Captured:
            pass
    _check_all_ran(linears, order)
    return list(groups.values())


def _compress_split(compress_group: CompressGroup, i: int, group: InputGroup, linears, device) -> dict:
    """One group; on a multi-thread CPU pool its linears in two halves side by side, one thread each. Each linear is
    its own segment of the stacked weight (its own mask threshold, rows swept independently on the shared inverse
    Hessian), so halves give what the stack gives, and the one pass does not leave a core idle during the sweeps."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return compress_group(i, group, linears)
    if len(group.names) < 2:  # nothing to run beside it: the factorisation and the sweep get every thread
        from .obs import wide_sweeps
        with wide_sweeps(threads):
            return compress_group(i, group, linears)
    halves: list[list[str]] = [[], []]
    rows = [0, 0]
    for n in sorted(group.names, key=lambda n: -linears[n].weight.numel()):  # greedy balance by size
        k = rows.index(min(rows))
        halves[k].append(n)
        rows[k] += linears[n].weight.numel()
    group.hessian.H  # mirror the triangle once, before the threads read it
    parts = [InputGroup([n for n in group.names if n in h], group.hessian) for h in halves]
    out: dict = {}
    for metrics in _one_thread_each(compress_group, i, parts, linears, 2):
        out.update(metrics)
    return out


def _compress_one_pass(model, windows, compress_group, device, forward_dtype, label) -> dict:
    from .obs import HessianAccumulator
    timings: dict[str, float] = {}
    per_layer: dict[str, dict] = {}
    structure: list[list[str]] | None = None
    # one batch: every window
    for i, n_blocks, block, runner, inputs in _walk_blocks(model, windows, len(windows), device, forward_dtype, label,
                                                            timings):
        linears = block_linears(block, f"layers.{i}")
        run_linears = block_linears(runner, f"layers.{i}")
        t_block = time.perf_counter()
        if structure is None or set(n for g in structure for n in g) != set(linears):
            structure = discover_groups(runner, inputs, run_linears)  # blocks share it; checked below
        leader_of = {n: g[0] for g in structure for n in g}
        members = {g[0]: g for g in structure}
        fed: dict[str, torch.Tensor] = {}
        spent = [0.0, 0.0]  # hessian, sweep seconds inside this forward

        def hook(name):
            def fn(module, args):
                x = args[0]
                lead = leader_of[name]
                if name != lead:
                    if fed.get(lead) is not x:
                        raise CompressError(f"layers.{i}.{name} does not read the same input as "
                                            f"layers.{i}.{lead} here, unlike the first block; compress this "
                                            f"model with one_pass off.")
                    return
                fed[name] = x
                t = time.perf_counter()
                group = InputGroup(list(members[name]), HessianAccumulator(x.shape[-1], device))
                group.hessian.add(x)
                t1 = time.perf_counter()
                for n, m in _compress_split(compress_group, i, group, linears, device).items():
                    per_layer[f"layers.{i}.{n}"] = m
                for n in group.names:  # the rest of this forward runs through the compressed weights
                    run_linears[n].weight.data.copy_(linears[n].weight.data.to(run_linears[n].weight.dtype))
                del group.hessian
                spent[0] += t1 - t
                spent[1] += time.perf_counter() - t1
            return fn

        with _pre_hooks(run_linears, hook):
            outs = _run_block(runner, inputs, keep_outputs=i + 1 < n_blocks)
        _check_all_ran(linears, [n for n in linears if f"layers.{i}.{n}" in per_layer])
        if outs:
            inputs.hidden = outs
        timings["hessian_s"] += spent[0]
        timings["sweep_s"] += spent[1]
        timings["forward_s"] += time.perf_counter() - t_block - spent[0] - spent[1]
    return {"layers": per_layer, "timings_s": {k: round(v, 2) for k, v in timings.items()}, "one_pass": True}
