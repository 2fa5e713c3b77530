"""Command line: parses and prints; the work lives in the stages."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import EdgeDistillError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Teacher LM → small, fast, verified edge artifacts (GGUF, ONNX) → served.")


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def build(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; none = the default build (SmolLM2-135M-Instruct teacher)"),
          out: Optional[Path] = typer.Option(None, "--out", help="build folder (default: out/<recipe name>)"),
          quick: bool = typer.Option(False, "--quick", help="same recipe with small step counts (minutes on 2 cores)"),
          force: bool = typer.Option(False, "--force", help="redo every stage even if up to date")) -> None:
    """Run the pipeline: teacher → student → distill → compress → export → evaluate → report."""
    from .build import run_build
    from .recipe import load_recipe
    try:
        r = load_recipe(recipe)
        if quick:
            r = r.quick()
        out_dir = out or Path("out") / r.name
        manifest = run_build(r, out_dir, force=force)
    except EdgeDistillError as e:
        _fail(e)
        return
    ppl = manifest.stages["eval"]["metrics"]["ppl"]
    print(f"\nBuild folder: {out_dir}")
    for k, v in ppl.items():
        print(f"  ppl {k:<32} {v:10.3f}")
    print(f"Report: {out_dir / 'report.md'}")


@app.command()
def serve(out_dir: Path = typer.Argument(..., help="build folder (or a .gguf file)"),
          host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
          port: int = typer.Option(8000, min=1, max=65535),
          api_key: Optional[str] = typer.Option(None, envvar="EDGEDISTILL_API_KEY", help="require this Bearer key"),
          backend: Optional[str] = typer.Option(None, help="llamacpp (GGUF, the default) | onnx | transformers; "
                                                "with --device, default: the runtime of the file chosen for it"),
          device: Optional[str] = typer.Option(None, help="device profile (`edgedistill devices list`): serve the "
                                               "file the build chose for it, sized to its threads, context, memory"),
          workers: int = typer.Option(1, min=1, help="model instances; requests go to the least busy one"),
          slots: Optional[int] = typer.Option(None, min=1, help="requests generated together per worker "
                                              "(default 8, or what --device's memory budget holds, at most 8)"),
          ctx: Optional[int] = typer.Option(None, min=16, help="context tokens per request (prompt + completion; "
                                            "default 2048, or --device's context)"),
          threads: Optional[int] = typer.Option(None, min=1, help="threads in all, shared by the workers (default: "
                                                "the runtime's choice, or --device's)"),
          max_queue: int = typer.Option(64, min=0, help="requests that may wait for a slot; beyond that, 429"),
          max_tokens: int = typer.Option(1024, min=1, help="largest max_tokens a request may ask for"),
          ui: bool = typer.Option(True, "--ui/--no-ui", help="mount the Gradio chat page at /ui"),
          llm: Optional[str] = typer.Option(None, help="a larger model served alongside: an OpenAI-compatible "
                                            "base URL (vLLM, llama-server, OpenAI) or a build folder / GGUF"),
          llm_api_key: Optional[str] = typer.Option(None, envvar="EDGEDISTILL_LLM_API_KEY",
                                                    help="Bearer key for --llm's URL"),
          llm_model: Optional[str] = typer.Option(None, help="the model to ask at --llm's URL (default: the first "
                                                  "of its /models, which must then answer at start)"),
          small_timeout: float = typer.Option(120.0, min=0.01, help="seconds the student gets to answer a "
                                              "routed request before it counts as failed (then --llm answers)"),
          llm_timeout: float = typer.Option(120.0, min=0.01, help="seconds --llm gets before the student's "
                                            "answer is returned instead"),
          cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="allow browsers on this origin "
                                                          "(repeatable, e.g. https://app.example.com); CORS is off "
                                                          "by default"),
          log_prompts: bool = typer.Option(False, "--log-prompts", help="put request bodies (prompts) in the "
                                           "access log; off by default, keys are never logged"),
          log_level: str = typer.Option("info", help="uvicorn log level")) -> None:
    """Serve the build (its GGUF by default) with an OpenAI-compatible API."""
    from .serve.app import run_server
    try:
        run_server(out_dir, host=host, port=port, api_key=api_key, slots=slots, ctx_per_slot=ctx,
                   n_threads=threads, max_queue=max_queue, max_tokens_cap=max_tokens, ui=ui, llm=llm,
                   llm_api_key=llm_api_key, llm_model=llm_model, small_timeout_s=small_timeout, large_timeout_s=llm_timeout,
                   log_level=log_level, cors_origins=cors_origin, log_prompts=log_prompts,
                   backend_kind=backend, device=device, workers=workers)
    except EdgeDistillError as e:
        _fail(e)


@app.command()
def demo(out_dir: Path = typer.Argument(..., help="build folder (or a .gguf file)"),
         port: int = typer.Option(7860, min=1, max=65535),
         threads: Optional[int] = typer.Option(None, min=1, help="llama.cpp threads")) -> None:
    """Chat with the build in the browser: the server plus its Gradio page, on http://127.0.0.1:PORT/ui."""
    from .serve.app import run_server
    try:
        run_server(out_dir, host="127.0.0.1", port=port, n_threads=threads, ui=True, log_level="warning")
    except EdgeDistillError as e:
        _fail(e)


@app.command("recipe")
def recipe_cmd(path: Optional[Path] = typer.Argument(None, help="recipe to validate and print resolved"),
               show_defaults: bool = typer.Option(False, "--show-defaults", help="print the default recipe")) -> None:
    """Validate a recipe and print it with every default filled in."""
    import yaml

    from .recipe import Recipe, load_recipe
    try:
        r = Recipe() if show_defaults or path is None else load_recipe(path)
    except EdgeDistillError as e:
        _fail(e)
        return
    print(yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False), end="")


@app.command()
def compress(model: str = typer.Argument(..., help="HF model folder (or hub id / .gguf) to compress"),
             method: str = typer.Option("sparsegpt", "--method", help="gptq | sparsegpt | structured | q8_0"),
             out: Path = typer.Option(..., "--out", help="output folder: model/ (+ quant_codes.safetensors)"),
             grid: Optional[str] = typer.Option(None, help="GGUF grid: q8_0 | q4_0 | q4_1 (gptq default q4_0)"),
             sparsity: float = typer.Option(0.5, help="sparsegpt: fraction removed; structured: FFN fraction removed"),
             pattern: str = typer.Option("unstructured", help="sparsegpt: unstructured | 2:4 | 4:8"),
             heads_sparsity: float = typer.Option(0.0, help="structured: fraction of KV head groups removed"),
             sparsity_profile: str = typer.Option("uniform", help="sparsegpt: uniform | owl (outlier-weighted per block)"),
             owl_threshold: float = typer.Option(5.0, help="owl: outlier when |W|·‖X‖ > this × the block's mean"),
             owl_lambda: float = typer.Option(0.08, help="owl: block sparsities within sparsity ± this"),
             calib_windows: int = typer.Option(32, help="calibration windows"),
             calib_seq_len: int = typer.Option(512, help="tokens per calibration window"),
             data: str = typer.Option("stdlib", help="calibration / held-out text: 'stdlib' or a file/folder"),
             device: str = typer.Option("auto", help="auto | cpu | cuda")) -> None:
    """Compress one model (SparseGPT, GPTQ on GGUF grids, structured pruning) and print its metrics."""
    import json

    from .compress.stage import compress_model
    from .data.text import load_corpus
    from .data.tokens import token_stream, windows
    from .models import load_tokenizer, resolve_model
    from .recipe import parse_recipe
    try:
        r = parse_recipe({"compress": {"method": method, "grid": grid, "sparsity": sparsity, "pattern": pattern,
                                       "heads_sparsity": heads_sparsity, "calib_windows": calib_windows,
                                       "sparsity_profile": sparsity_profile, "owl_threshold": owl_threshold,
                                       "owl_lambda": owl_lambda,
                                       "calib_seq_len": calib_seq_len, "device": device},
                          "data": {"source": data},
                          # only so the recipe's "codes are exported" check holds; this command exports nothing
                          "export": {"gguf": ["f16"] + ([grid or "q4_0"] if method == "gptq" else [grid] if grid else [])}})
        model_dir = resolve_model(model)
        tok = load_tokenizer(model_dir)
        corpus = load_corpus(r.data.source, r.data.max_chars, r.data.heldout_fraction, r.data.seed)
        spec = r.compress
        calib = windows(token_stream(tok, corpus.train, spec.calib_windows * spec.calib_seq_len), spec.calib_seq_len,
                        spec.calib_windows, what="calibration text")
        heldout = windows(token_stream(tok, corpus.heldout, spec.eval_windows * r.eval.seq_len), r.eval.seq_len,
                          spec.eval_windows, what="held-out text")
        from .artifacts import atomic_dir, atomic_write_json
        with atomic_dir(out) as tmp:
            metrics = compress_model(model_dir, tmp, spec, tok, calib, heldout)
            atomic_write_json(tmp / "compress_metrics.json", metrics)
    except EdgeDistillError as e:
        _fail(e)
        return
    summary = {k: metrics[k] for k in ("method", "ppl_before", "ppl_after", "compress_seconds", "params",
                                       "block_linear_sparsity", "mean_rel_error") if k in metrics}
    print(json.dumps(summary))
    print(f"Compressed model: {out / 'model'}  (metrics: {out / 'compress_metrics.json'})")


@app.command("distill")
def distill_cmd(
        teacher: str = typer.Option(..., "--teacher", help="teacher: HF model dir, hub id, .gguf, or 'smollm2-135m-instruct'"),
        student: str = typer.Option("depth_prune", "--student", help="student model dir/id, or 'depth_prune' (teacher's most important half)"),
        data: str = typer.Option("stdlib", "--data", help="text file/folder, 'stdlib', or chat JSONL (.jsonl with 'messages')"),
        out: Path = typer.Option(..., "--out", help="folder for the distilled student"),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="take the distill: section of this recipe; options override it"),
        loss: Optional[str] = typer.Option(None, help="forward_kl | reverse_kl | jsd"),
        beta: Optional[float] = typer.Option(None, help="JSD β (0 → forward KL, 1 → reverse KL)"),
        temperature: Optional[float] = typer.Option(None),
        ce_weight: Optional[float] = typer.Option(None, help="share of hard-label cross-entropy"),
        steps: Optional[int] = typer.Option(None), batch_size: Optional[int] = typer.Option(None),
        grad_accum: Optional[int] = typer.Option(None), seq_len: Optional[int] = typer.Option(None),
        lr: Optional[float] = typer.Option(None), warmup_steps: Optional[int] = typer.Option(None),
        chunk_tokens: Optional[int] = typer.Option(None),
        teacher_mode: Optional[str] = typer.Option(None, help="online | offline (top-k cache)"),
        teacher_quant: Optional[str] = typer.Option(None, help="none | nf4 (4-bit teacher via bitsandbytes, GPU only)"),
        top_k: Optional[int] = typer.Option(None), prompts: Optional[str] = typer.Option(None, help="prompt JSONL for on-policy / sequence-level KD"),
        on_policy_fraction: Optional[float] = typer.Option(None, help="GKD λ"),
        sequence_kd_fraction: Optional[float] = typer.Option(None), max_new_tokens: Optional[int] = typer.Option(None),
        quantize_aware: Optional[str] = typer.Option(None, help="q8_0 | q4_0 | q4_1"),
        precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16"),
        compile: Optional[bool] = typer.Option(None, "--compile/--no-compile"),
        gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
        checkpoint_blocks: Optional[int] = typer.Option(None, help="gradient checkpointing of the first N student "
                                                        "blocks only (overrides --gradient-checkpointing)"),
        cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                                   help="with --compile on a CUDA GPU: replay the blocks as CUDA graphs"),
        memory_budget: Optional[float] = typer.Option(None, help="with --compile: fraction (0-1) of the blocks' "
                                                      "saved activations kept; the cheapest others are recomputed"),
        eval_every: Optional[int] = typer.Option(None), checkpoint_every: Optional[int] = typer.Option(None),
        seed: Optional[int] = typer.Option(None)) -> None:
    """Distill a student from a teacher (the same fields as the recipe's distill: section)."""
    import json

    from pydantic import ValidationError

    from .distill.run import distill_from_paths
    from .recipe import DistillSpec, load_recipe
    options = {k: v for k, v in locals().items() if k in DistillSpec.model_fields and v is not None}
    if checkpoint_blocks is not None:
        options["gradient_checkpointing"] = checkpoint_blocks
    try:
        base = load_recipe(recipe).distill.model_dump() if recipe else {}
        try:
            spec = DistillSpec.model_validate({**base, **options})
        except ValidationError as e:
            msgs = [f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()]
            raise EdgeDistillError("invalid distill options:\n  " + "\n  ".join(msgs)) from None
        metrics = distill_from_paths(teacher, student, data, out, spec)
    except EdgeDistillError as e:
        _fail(e)
        return
    summary = {k: metrics.get(k) for k in ("loss", "steps", "tokens", "tokens_per_s", "loss_first", "loss_last",
                                           "final_eval", "quantize_aware")}
    print(json.dumps(summary, indent=1))
    print(f"Student: {out}")


@app.command("export")
def export_cmd(model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json + safetensors)"),
               to: str = typer.Option(..., "--to", help="gguf[:TYPE] (f32 f16 q8_0 q4_0 q4_1 q4_k_m q5_k_m q6_k; "
                                                        "default f16) or onnx[:int8|int4] (default fp32)"),
               out: Path = typer.Option(..., "--out", help="output file (.gguf / .onnx)"),
               codes: Optional[Path] = typer.Option(None, "--codes", help="quant_codes.safetensors from `edgedistill "
                                                    "compress`: the weights it covers are written from their codes")) -> None:
    """Export a model folder to GGUF or ONNX (with KV cache), checked as it is written."""
    from .export.cli import export_model
    try:
        info = export_model(model_dir, to, out, codes_file=codes)
    except EdgeDistillError as e:
        _fail(e)
        return
    print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB, {info['what']})")
    if info.get("fallback"):
        print(f"  tensors in a fallback type: {info['fallback']}")


devices_app = typer.Typer(no_args_is_help=True, help="Device profiles and fitting a build to a device.")
app.add_typer(devices_app, name="devices")


@devices_app.command("list")
def devices_list(measure: bool = typer.Option(False, "--measure", help="also benchmark this machine for `host`")) -> None:
    """Known device profiles: memory budget, bandwidth, compute, context."""
    from .devices.profiles import known_devices, load_profile
    print(f"{'device':<22} {'RAM GB':>7} {'budget GB':>9} {'GB/s':>7} {'GFLOP/s':>8} {'context':>8}  runtimes")
    for name in known_devices():
        p = load_profile(name, measure=measure)
        note = "  (measured on use)" if p.measure and not measure else ""
        print(f"{name:<22} {p.ram_gb:>7.1f} {p.budget_gb:>9.1f} {p.memory_bandwidth_gbs:>7.1f} "
              f"{p.compute_gflops:>8.0f} {p.default_context:>8}  {', '.join(p.runtimes)}{note}")


@devices_app.command("fit")
def devices_fit(out_dir: Path = typer.Argument(..., help="build folder"),
                device: str = typer.Option(..., "--device", help="profile name (see `edgedistill devices list`)"),
                context: Optional[int] = typer.Option(None, "--context", help="context length (default: the profile's)"),
                as_json: bool = typer.Option(False, "--json", help="print the full fit report as JSON")) -> None:
    """Which exported file fits DEVICE, with memory and predicted speed for every file."""
    import json

    from .devices.plan import fit_build
    try:
        rep = fit_build(out_dir, device, context=context)
    except EdgeDistillError as e:
        _fail(e)
        return
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    print(f"{'file':<34} {'format':>7} {'MB':>7} {'of budget':>9} {'decode tok/s':>12} {'prefill tok/s':>13}")
    for f in rep["fits"]:
        mark = "*" if f["path"] == rep["choice"]["path"] else " " if f["fits"] and f["supported"] else "x"
        print(f"{mark}{f['path']:<33} {f['format']:>7} {f['total_mb']:>7.0f} {f['budget_mb']:>9.0f} "
              f"{f['decode_tps']:>12.1f} {f['prefill_tps']:>13.0f}")
    print(f"chosen for {device}: {rep['choice']['path']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
