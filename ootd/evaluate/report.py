"""The evaluation's human-readable side: the markdown report and its matplotlib plots (Agg, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VARIANT_TITLES = {
    "histogram_crop": "colour histogram · outfit crop",
    "frozen_random_crop": "frozen random init · outfit crop",
    "frozen_crop": "frozen backbone · outfit crop",
    "frozen_whole": "frozen backbone · whole photo",
    "finetuned_crop": "fine-tuned · outfit crop",
    "finetuned_whole": "fine-tuned · whole photo",
}
TABLE_COLUMNS = ("P@1", "P@5", "P@10", "mAP@10", "nDCG@10", "MRR", "silhouette")
# The learned model and what it must beat (DESIGN §8), compared on this metric.
TUNED, BASELINES, HEADLINE = "finetuned_crop", ("histogram_crop", "frozen_crop"), "mAP@10"


def markdown_table(variants: dict[str, dict[str, Any]]) -> str:
    """One row per variant, one column per headline metric (3 decimals; `n/a` where undefined)."""
    lines = ["| variant | " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for name, scores in variants.items():
        cells = [_fmt(scores.get(column)) for column in TABLE_COLUMNS]
        lines.append(f"| {VARIANT_TITLES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_findings(variants: dict[str, dict[str, Any]]) -> list[str]:
    """One plain sentence per baseline that the fine-tuned crop embedding fails to beat on mAP@10 (ties fail too).

    Args:
        variants: metrics per variant name (as `ootd.evaluate.run` scores them).

    Returns:
        Empty when fine-tuning beats every baseline present (or no fine-tuned variant was scored).
    """
    tuned = variants.get(TUNED, {}).get(HEADLINE)
    if tuned is None:
        return []
    findings = []
    for name in BASELINES:
        base = variants.get(name, {}).get(HEADLINE)
        if base is not None and not tuned > base:
            findings.append(
                f"The fine-tuned model does NOT beat the {VARIANT_TITLES[name]} baseline: {HEADLINE} "
                f"{_fmt(tuned)} vs {_fmt(base)} (P@10 {_fmt(variants[TUNED].get('P@10'))} vs "
                f"{_fmt(variants[name].get('P@10'))}). This recipe's embedding is a finding, not a result: "
                "it should not be indexed in place of the baseline."
            )
    return findings


def markdown_report(table: str, variants: dict[str, dict[str, Any]], header: dict[str, Any], files: dict) -> str:
    """report.md: what was evaluated, the table, what fine-tuning and cropping changed, warnings and plots."""
    counts = header["counts"]
    twin = header.get("random_backbone")
    untrained = f", frozen random init = the pooled features of its untrained twin `{twin}`" if twin else ""
    lines = [
        f"# ootd evaluation — model {header['model_version'] or Path(header['model_dir']).name}",
        "",
        f"Split `{header['split']}` (val_fraction={header['val_fraction']}, test_fraction={header['test_fraction']}):"
        f" {header['n_images']} labelled images in {len(counts)} styles"
        f" ({', '.join(f'{s} {n}' for s, n in counts.items())}).",
        f"Image-to-image retrieval, every image queries all others; relevant = same style, the query itself excluded."
        f" Colour histogram = {header['embedding_dims'].get('histogram', 512)}-d RGB histogram of the crop, cosine,"
        f" no learning; frozen = pooled features of `{header['baseline_backbone']}`"
        f" ({header['embedding_dims']['frozen']}-d){untrained}; fine-tuned = the model's"
        f" {header['embedding_dims']['finetuned']}-d embedding.",
        "",
        table,
        "",
    ]
    findings = header.get("findings") or []
    if findings:
        lines += ["## Verdict: fine-tuning does not beat its baselines", ""] + [f"- **{f}**" for f in findings] + [""]
    elif TUNED in variants and all(b in variants for b in BASELINES):
        tuned = variants[TUNED].get(HEADLINE)
        margins = ", ".join(f"{VARIANT_TITLES[b]} {_signed(tuned, variants[b].get(HEADLINE))}" for b in BASELINES)
        lines += ["## Verdict", "", f"- The fine-tuned model beats both baselines on {HEADLINE} ({margins}).", ""]
    for label, before, after in (
        ("learning at all (fine-tuned vs colour histogram, outfit crop)", "histogram_crop", "finetuned_crop"),
        ("the backbone's pretraining (frozen, outfit crop)", "frozen_random_crop", "frozen_crop"),
        ("fine-tuning (outfit crop)", "frozen_crop", "finetuned_crop"),
        ("cropping (fine-tuned)", "finetuned_whole", "finetuned_crop"),
    ):
        if before in variants and after in variants:
            diffs = [
                f"{m} {_signed(variants[after].get(m), variants[before].get(m))}" for m in ("P@10", "mAP@10", "MRR")
            ]
            lines.append(f"- Effect of {label}: " + ", ".join(diffs))
    gaps = ", ".join(f"{VARIANT_TITLES[n]} {_fmt(v.get('style_gap'))}" for n, v in variants.items())
    lines += [f"- Same-style minus cross-style mean cosine (style matrix diagonal vs off-diagonal): {gaps}", ""]
    if header["warnings"] or header["skipped"]["count"]:
        lines.append("## Warnings")
        lines += [f"- {w}" for w in header["warnings"]]
        if header["skipped"]["count"]:
            n = header["skipped"]["count"]
            lines.append(f"- {n} image{'s' if n != 1 else ''} left out (crop or photo unreadable); see metrics.json")
        lines.append("")
    lines += [
        "## Plots",
        "",
        f"![style similarity matrices]({Path(files['style_matrix']).name})",
        "",
        f"![precision at K]({Path(files['precision_at_k']).name})",
        "",
    ]
    return "\n".join(lines)


def plot_style_matrices(variants: dict[str, dict[str, Any]], classes: list[str], header: dict, path: Path) -> Path:
    """Histogram, frozen and fine-tuned crop style matrices side by side, each on its own colour scale."""
    plt = _pyplot()
    shown = [name for name in ("histogram_crop", "frozen_crop", "finetuned_crop") if name in variants]
    size = max(5.0, 0.45 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, len(shown), figsize=(size * len(shown) + 1.0, size), squeeze=False)
    for ax, name in zip(axes[0], shown, strict=True):
        matrix = np.array(variants[name]["style_matrix"], dtype=float)
        finite = matrix[np.isfinite(matrix)]
        # Frozen features crowd into a narrow band of high cosines; a per-panel scale keeps the contrast visible.
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        image = ax.imshow(matrix, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("style")
        ax.set_ylabel("style")
        v = variants[name]
        ax.set_title(
            f"{VARIANT_TITLES[name]} ({v['dim']}-d)\nsilhouette {_fmt(v.get('silhouette'))}, "
            f"same − cross style cos {_fmt(v.get('style_gap'))}",
            fontsize=10,
        )
        for i in range(len(classes)):  # outline the diagonal: it should dominate its row and column
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
        if len(classes) <= 16:
            mid = (lo + hi) / 2
            for (i, j), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    color = "black" if value > mid else "white"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
                else:
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=6, color="gray")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean cosine similarity")
    fig.suptitle(
        f"Mean cosine similarity between styles — split '{header['split']}', {header['n_images']} images "
        "(red diagonal: distinct same-style pairs; n/a: fewer than 2 images)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_precision(variants: dict[str, dict[str, Any]], header: dict, path: Path) -> Path:
    """Grouped bars: P@1/5/10 per variant, and mAP@10 / nDCG@10 / MRR beside them."""
    plt = _pyplot()
    panels = (("Precision at K", ("P@1", "P@5", "P@10"), "precision"),
              ("Ranking quality", ("mAP@10", "nDCG@10", "MRR"), "score"))  # fmt: skip
    names = list(variants)
    width = 0.8 / max(1, len(names))
    colors = {
        "histogram_crop": "#bdbdbd",
        "frozen_random_crop": "#e0e0e0",
        "frozen_crop": "#9ecae1",
        "frozen_whole": "#c6dbef",
        "finetuned_crop": "#08519c",
        "finetuned_whole": "#4292c6",
    }
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (title, metrics, ylabel) in zip(axes, panels, strict=True):
        x = np.arange(len(metrics))
        for i, name in enumerate(names):
            values = [variants[name].get(m) or 0.0 for m in metrics]
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=VARIANT_TITLES.get(name, name),
                          color=colors.get(name), edgecolor="black", linewidth=0.5)  # fmt: skip
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
        ax.set_xticks(x, metrics)
        ax.set_xlabel("metric")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.08)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"Same-style retrieval — split '{header['split']}', {header['n_images']} images, "
        f"{len(header['counts'])} styles",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and never a GUI backend on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"


def _signed(after: Any, before: Any) -> str:
    if after is None or before is None:
        return "n/a"
    return f"{after - before:+.3f}"
