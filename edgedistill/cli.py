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
          api_key: Optional[str] = typer.Option(None, envvar="EDGEDISTILL_API_KEY", help="require this Bearer key")) -> None:
    """Serve the build's GGUF with an OpenAI-compatible API."""
    from .serve.app import run_server
    try:
        run_server(out_dir, host=host, port=port, api_key=api_key)
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
        top_k: Optional[int] = typer.Option(None), prompts: Optional[str] = typer.Option(None, help="prompt JSONL for on-policy / sequence-level KD"),
        on_policy_fraction: Optional[float] = typer.Option(None, help="GKD λ"),
        sequence_kd_fraction: Optional[float] = typer.Option(None), max_new_tokens: Optional[int] = typer.Option(None),
        quantize_aware: Optional[str] = typer.Option(None, help="q8_0 | q4_0 | q4_1"),
        precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16"),
        compile: Optional[bool] = typer.Option(None, "--compile/--no-compile"),
        gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
        eval_every: Optional[int] = typer.Option(None), checkpoint_every: Optional[int] = typer.Option(None),
        seed: Optional[int] = typer.Option(None)) -> None:
    """Distill a student from a teacher (the same fields as the recipe's distill: section)."""
    import json

    from pydantic import ValidationError

    from .distill.run import distill_from_paths
    from .recipe import DistillSpec, load_recipe
    options = {k: v for k, v in locals().items() if k in DistillSpec.model_fields and v is not None}
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
