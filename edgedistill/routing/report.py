"""The routing evaluation as a Markdown table and a Pareto plot (accuracy vs generated tokens)."""
from __future__ import annotations

import io
from pathlib import Path

from ..artifacts import atomic_path, atomic_write_text

ROWS = [("teacher only, think", "teacher_acc_think", "teacher_tokens_think", "teacher_think"),
        ("teacher only, direct", "teacher_acc_nothink", "teacher_tokens_nothink", "teacher_nothink"),
        ("student, no think", "student_acc_nothink", "nothink_tokens", "student_nothink"),
        ("student, always think", "always_think_acc", "always_think_tokens", "student_think"),
        ("student, adaptive think", "adaptive_acc", "adaptive_tokens", None),
        ("routed (adaptive + escalation)", "routed_acc", "routed_tokens", "routed")]


def routing_table(m: dict) -> str:
    lines = ["| strategy | accuracy | generated tokens / problem | latency / problem (s) |", "|---|---|---|---|"]
    for name, acc, tok, lat in ROWS:
        latency = f"{m['latency_s'][lat]:.2f}" if lat else "—"
        lines.append(f"| {name} | {m[acc]:.3f} | {m[tok]:.1f} | {latency} |")
    target = m.get("target") or {}
    lines += ["", f"Think rate {m['think_rate']:.2f} (threshold {m.get('think_threshold')}), thinking budget hits "
                  f"{m['budget_hits']}; escalation rate {m['escalation_rate']:.2f} (threshold "
                  f"{m.get('escalation_threshold')}, target {target.get('kind')} = {target.get('value')}); "
                  f"escalation to the teacher in mode '{m.get('teacher_mode')}' (calibration accuracy by mode: "
                  f"{m.get('teacher_calib_acc')}; thinking only where its gain beats the tolerance by one standard "
                  f"error: {m.get('teacher_mode_choice')}); routed / teacher-only accuracy in that mode "
                  f"{m.get('routed_vs_teacher')}, / the better teacher mode on this split "
                  f"{m.get('routed_vs_best_teacher')}; adaptive token saving vs always-think "
                  f"{m.get('adaptive_token_saving')}; policy overhead p95 {m['policy_overhead_ms_p95']} ms.",
              "", "| difficulty | teacher think | teacher direct | student think | student direct | adaptive | routed |",
              "|---|---|---|---|---|---|---|"]
    for d, r in m["by_difficulty"].items():
        lines.append(f"| {d} | {r['teacher_on']:.2f} | {r['teacher_off']:.2f} | {r['student_on']:.2f} | "
                     f"{r['student_off']:.2f} | {r['adaptive_correct']:.2f} | {r['routed_correct']:.2f} |")
    if m.get("escalation_calibration"):
        lines += ["", "Requested escalation rate (threshold calibrated on the calibration split) vs what it gives on the "
                      "held-out split:", "", "| requested | calibration | held-out | routed accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['requested']:.2f} | {r['calib_rate']:.2f} | {r['test_rate']:.2f} | {r['test_routed_acc']:.3f} |"
                  for r in m["escalation_calibration"]]
    lines += ["", f"Generation: {m.get('generation_backend')}; {m.get('test_size')} held-out problems, "
                  f"{m.get('calib_size')} calibration problems."]
    return "\n".join(lines) + "\n"


def write_routing_report(rdir: Path, m: dict, rows: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    curves = m["curves"]
    ax.plot(*zip(*[(x, y) for x, y in curves["adaptive"]]), ".-", color="#3a7", lw=1, ms=3,
            label="adaptive think, threshold swept")
    ax.plot(*zip(*[(x, y) for x, y, _ in curves["routed"]]), ".-", color="#37a", lw=1, ms=3,
            label="routed, escalation threshold swept")
    for name, acc, tok, _ in ROWS:
        ax.scatter([m[tok]], [m[acc]], s=45, zorder=3)
        ax.annotate(name, (m[tok], m[acc]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("generated tokens per problem (mean)")
    ax.set_ylabel("accuracy on the held-out split")
    ax.set_title("accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    # Routed accuracy against the share of requests escalated, with the teacher-only bar and 95% of it.
    ax2.plot([e for _, _, e in curves["routed"]], [y for _, y, _ in curves["routed"]], ".-", color="#37a", lw=1, ms=3,
             label="routed, escalation threshold swept")
    ax2.axhline(m["teacher_acc"], color="#a33", lw=1, label=f"teacher only ({m.get('teacher_mode', 'on')})")
    ax2.axhline(0.95 * m["teacher_acc"], color="#a33", lw=1, ls="--", label="95% of teacher only")
    ax2.scatter([m["escalation_rate"]], [m["routed_acc"]], s=45, zorder=3, color="#37a")
    ax2.annotate("calibrated policy", (m["escalation_rate"], m["routed_acc"]), textcoords="offset points",
                 xytext=(5, -12), fontsize=8)
    ax2.set_xlabel("escalation rate (held-out)")
    ax2.set_ylabel("accuracy on the held-out split")
    ax2.set_title("routed accuracy vs escalations")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = rdir / "pareto.png"
    with atomic_path(png) as tmp:
        tmp.write_bytes(buf.getvalue())
    md = rdir / "report.md"
    atomic_write_text(md, "# Routing evaluation\n\n" + routing_table(m) + "\n![accuracy vs cost](pareto.png)\n")
    return [md, png]
