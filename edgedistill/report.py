"""The build report: a Markdown page and PNG plots a person would rather look at than read."""
from __future__ import annotations

import io
from pathlib import Path

from .artifacts import Manifest, atomic_path, atomic_write_text


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _plot(path: Path, ppl: dict[str, float], sizes: dict[str, int], loss_curve: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    names = list(ppl)
    axes[0].barh(names, [ppl[n] for n in names], color=["#888" if "/" not in n else "#3a7" for n in names])
    axes[0].set_xscale("log")
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("held-out perplexity (log scale, lower is better)")
    axes[0].invert_yaxis()
    for i, n in enumerate(names):
        axes[0].text(ppl[n], i, f" {ppl[n]:.2f}", va="center", fontsize=8)
    files = list(sizes)
    axes[1].barh(files, [sizes[f] / 2**20 for f in files], color="#37a")
    axes[1].set_xlabel("file size (MiB)")
    axes[1].invert_yaxis()
    if loss_curve:
        axes[2].plot(range(1, len(loss_curve) + 1), loss_curve, lw=1)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("KD loss (forward KL)")
        axes[2].set_title("distillation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _devices_section(devices: dict) -> list[str]:
    if not devices:
        return []
    lines = ["", "## Target devices (predicted)", "",
             "| device | chosen file | memory (MB of budget) | decode tok/s | prefill tok/s |",
             "|---|---|---:|---:|---:|"]
    for name, rep in devices.items():
        c = rep["choice"]
        lines.append(f"| {name} | `{c['path']}` ({c['format']}) | {c['total_mb']:.0f} / {c['budget_mb']:.0f} | "
                     f"{c['decode_tps']:.1f} | {c['prefill_tps']:.0f} |")
    return lines


def write_report(out_dir: Path, manifest: Manifest) -> list[Path]:
    st = manifest.stages
    ev = st["eval"]["metrics"]
    ppl: dict[str, float] = ev["ppl"]
    sizes: dict[str, int] = ev.get("bytes", {})
    top1 = ev.get("top1_agreement", {})
    kl = ev.get("kl_to_reference", {})
    dist = st["distill"]["metrics"]
    init = st["student_init"]["metrics"]
    teacher = st["teacher"]["metrics"]
    png = out_dir / "report.png"
    _plot(png, ppl, sizes, dist.get("loss_curve", []))
    lines = [
        f"# edgedistill build: {manifest.data['recipe'].get('name', '?')}", "",
        f"Teacher: `{manifest.data['recipe']['teacher']['model']}` ({teacher['architecture']}, {teacher['layers']} layers, "
        f"{teacher['params'] / 1e6:.1f}M params).",
        f"Student: {init.get('init')} → {init.get('student_layers', '?')} layers, "
        f"{init.get('student_params', 0) / 1e6:.1f}M params" + (f" (kept layers {init['kept_layers']})." if "kept_layers" in init else "."),
        f"Distillation: {dist['steps']} steps, {dist['tokens']:,} tokens on {dist['device']} at {dist['tokens_per_s']:,.0f} tokens/s; "
        f"KD loss {dist['loss_first']:.3f} → {dist['loss_last']:.3f}.", "",
        "![perplexity, size and loss](report.png)", "",
        f"## Held-out evaluation ({ev['windows']} windows, {ev['tokens']:,} predicted tokens)", "",
        "| variant | perplexity | top-1 agreement vs torch student | KL to torch student | size | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    tps = ev.get("decode_tps", {})
    for name, value in ppl.items():
        t = f"{top1[name]:.4f}" if name in top1 else "—"
        k = f"{kl[name]:.5f}" if name in kl else "—"
        d = f"{tps[name]:.1f}" if name in tps else "—"
        lines.append(f"| `{name}` | {value:.3f} | {t} | {k} | {_fmt_bytes(sizes.get(name))} | {d} |")
    lines += _devices_section(st.get("devices", {}).get("metrics", {}))
    if ev.get("routing"):
        from .routing.report import routing_table
        lines += ["", "## Adaptive thinking and routing (reasoning suite, held-out split)", "",
                  routing_table(st["routing"]["metrics"]), "![accuracy vs generated tokens](routing/pareto.png)"]
    lines += ["", "## Stages", "", "| stage | seconds | outputs |", "|---|---:|---:|"]
    for name, rec in st.items():
        if name == "report":
            continue
        lines.append(f"| {name} | {rec['seconds']:.1f} | {len(rec['outputs'])} files |")
    lines.append("")
    md = out_dir / "report.md"
    atomic_write_text(md, "\n".join(lines))
    return [md, png]
