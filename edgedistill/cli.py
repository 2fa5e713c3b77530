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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
