"""results.json -> results.md (tables) and the PNG plots (error per format and blocksize; loss curves with seed bands)."""

from __future__ import annotations

from pathlib import Path

LABELS = {"nf4": "NF4", "fp4": "FP4", "int4": "INT4"}


def config_label(row: dict) -> str:
    """"NF4+DQ bs64" for one quantization config row."""
    return f"{LABELS[row['quant_type']]}{'+DQ' if row['double_quant'] else ''} bs{row['blocksize']}"


def error_table(study: dict) -> list[str]:
    """One markdown table of a model's quantization-error rows."""
    lm = "ppl_increase_pct" in study["rows"][0]
    head = "| config | weight rel. MSE | layer rel. error | " + ("perplexity | ppl vs base |" if lm else "embedding cosine |")
    lines = [f"**{study['model']}**: {study['linears']} linears; end metric: {study['end_metric']}, "
             f"reference {study['reference']:.4f}." + (f" {study['note']}." if study.get("note") else ""), "",
             head, "|---|---:|---:|" + ("---:|---:|" if lm else "---:|")]
    for row in study["rows"]:
        cells = [config_label(row), f"{row['weight_rel_mse']:.5f}", f"{row['layer_rel_error']:.4f}",
                 f"{row['end_metric']:.4f}"]
        if lm:
            cells.append(f"{row['ppl_increase_pct']:+.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def finetune_table(part: dict) -> list[str]:
    """The markdown table of the fine-tuning arms (mean ± std over seeds)."""
    lines = [f"{part['model']}, {part['steps']} steps x {part['micro_batch']} sequences of {part['seq_len']} tokens, "
             f"{part['lora']}; seeds {part['seeds']}; held-out: {part['eval_conversations']} conversations.", "",
             "| arm | held-out loss | held-out perplexity | ppl vs LoRA 16-bit | s / run |", "|---|---:|---:|---:|---:|"]
    for row in part["summary"]:
        gap = "" if row["ppl_vs_lora16_pct"] is None else f"{row['ppl_vs_lora16_pct']:+.2f}%"
        lines.append(f"| {row['arm']} | {row['eval_loss_mean']:.4f} ± {row['eval_loss_std']:.4f} | "
                     f"{row['eval_ppl_mean']:.3f} ± {row['eval_ppl_std']:.3f} | {gap} | {row['seconds_per_run']:.0f} |")
    return lines + [""]


def write_markdown(results: dict, path: Path) -> None:
    """results.md: the environment, one error table per model, the fine-tuning table."""
    env = results["environment"]
    lines = ["# Quantization quality: measured results", "",
             f"Made by `{env['command']}` on {env['date_utc']} UTC; CPU flags {', '.join(env['cpu_flags'])}; "
             f"{env['threads']} threads; torch {env['torch']}; {env.get('wall_seconds', '?')} s.", ""]
    if results.get("quantization_error"):
        lines += ["## Pure quantization error", ""]
        for study in results["quantization_error"]:
            lines += error_table(study)
    part = results.get("finetune")
    if part and "summary" in part:
        lines += ["## Fine-tuning quality", ""] + finetune_table(part)
    elif part:
        lines += ["## Fine-tuning quality", "", f"Skipped: {part['skipped']}", ""]
    path.write_text("\n".join(lines))


def write_plots(results: dict, directory: Path) -> None:
    """error_by_format.png (layer error per config and model) and loss_curves.png (training loss, seed bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    studies = results.get("quantization_error") or []
    if studies:
        figure, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 3.6), squeeze=False)
        for axis, study in zip(axes[0], studies):
            blocksizes = sorted({row["blocksize"] for row in study["rows"]})
            for (quant_type, dq), style in zip([(q, d) for q in LABELS for d in (True, False)], ["-", "--"] * 3):
                rows = sorted((r for r in study["rows"] if r["quant_type"] == quant_type and r["double_quant"] == dq),
                              key=lambda r: r["blocksize"])
                color = {"nf4": "C0", "fp4": "C3", "int4": "C2"}[quant_type]
                axis.plot([r["blocksize"] for r in rows], [r["layer_rel_error"] for r in rows], style, marker="o",
                          color=color, label=f"{LABELS[quant_type]}{'+DQ' if dq else ''}")
            axis.set_xscale("log", base=2)
            axis.set_xticks(blocksizes, [str(b) for b in blocksizes])
            axis.set_title(study["model"], fontsize=9)
            axis.set_xlabel("blocksize")
            axis.set_ylabel("relative layer output error")
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(directory / "error_by_format.png", dpi=90)
        plt.close(figure)
    part = results.get("finetune")
    if part and "runs" in part:
        figure, axis = plt.subplots(figsize=(6.4, 4))
        for index, (arm, runs) in enumerate(part["runs"].items()):
            curves = np.array([run["losses"] for run in runs])
            steps = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            axis.plot(steps, mean, color=f"C{index}", label=arm)
            axis.fill_between(steps, mean - std, mean + std, color=f"C{index}", alpha=0.2)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (mean ± std over seeds)")
        axis.set_title(part["model"], fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(directory / "loss_curves.png", dpi=90)
        plt.close(figure)
