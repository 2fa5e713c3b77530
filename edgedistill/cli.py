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


@app.command("export")
def export_cmd(model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json + safetensors)"),
               to: str = typer.Option(..., "--to", help="gguf[:TYPE] (f32 f16 q8_0 q4_0 q4_1 q4_k_m q5_k_m q6_k; "
                                                        "default f16) or onnx[:int8|int4] (default fp32)"),
               out: Path = typer.Option(..., "--out", help="output file (.gguf / .onnx)")) -> None:
    """Export a model folder to GGUF or ONNX (with KV cache), checked as it is written."""
    from .export.cli import export_model
    try:
        info = export_model(model_dir, to, out)
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
