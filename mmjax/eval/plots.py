"""PNG figures of a workdir's training and evaluation (matplotlib, no display needed).

    training_curves(records, evals, out)                     loss (metrics.jsonl) and every eval metric vs step
    confusion_matrix(labels, preds, class_names, out)  zero-shot confusion matrix
    contact_sheet(queries, images, top_idx, out)       the top-k retrieved images for a few text queries
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from mmjax import storage


def _plt():
    import matplotlib  # slow to import; only the figures of `mmjax eval` need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def _save(fig, out: str) -> None:
    """Writes the figure as a PNG to `out`, a local path or a bucket URL (rendered in memory, written whole)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes_atomic(out, buffer.getvalue())


def _series(records: list[dict], eval_results: dict[int, dict]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every metric with a '/' in its name, from the records and the eval results."""
    series: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if "/" in k and isinstance(v, (int, float)):
                series.setdefault(k, {})[r["step"]] = v
    for step, m in eval_results.items():
        for k, v in m.items():
            if "/" in k and isinstance(v, (int, float)) and not k.endswith("/l2"):
                series.setdefault(k, {})[step] = v
    return series


def curve_panels(records: list[dict], eval_results: dict[int, dict]) -> dict[str, dict[str, dict[int, float]]]:
    """The panels of `training_curves`: {title: {key: {step: value}}}. 'training loss'; one panel per evaluation
    family (the key's first part: zeroshot, retrieval, linear_probe, caption, vqa, fewshot, ...) over the steps it
    was evaluated at; and 'data health' with the `data/*` counters that were ever non-zero (none: no panel)."""
    panels: dict[str, dict[str, dict[int, float]]] = {
        "training loss": {"loss": {r["step"]: r["loss"] for r in records if "loss" in r}}}
    health = {}
    for key, points in sorted(_series(records, eval_results).items()):
        family = key.split("/", 1)[0]
        if family == "data":
            if any(v != 0 for v in points.values()) and key != "data/epoch":
                health[key] = points
            continue
        panels.setdefault(family, {})[key] = points
    if health:
        panels["data health"] = health
    return panels


def training_curves(records: list[dict], eval_results: dict[int, dict], out: str) -> str:
    """W/eval/curves.png: the training loss, then one panel per evaluation family (`curve_panels`) with its
    metrics at the evaluated steps, then the data-health counters when any is non-zero."""
    plt = _plt()
    panels = curve_panels(records, eval_results)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for i, (key, points) in enumerate(sorted(series.items())):
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o" if title != "training loss" else None,
                    label=key, color=f"C{i % 10}", linestyle="--" if "t2i" in key else "-")
        values = [v for points in series.values() for v in points.values()]
        unit = title not in ("training loss", "data health") and all(0 <= v <= 1 for v in values)
        ax.set(xlabel="step", title=title, ylim=(0, 1.02) if unit else None)
        ax.grid(alpha=0.3)
        if title != "training loss" and series:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], out: str,
                     title: str = "zero-shot confusion matrix") -> str:
    """Row-normalised confusion matrix (true class rows, predicted class columns) with counts."""
    plt = _plt()
    c = len(class_names)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5.0, 0.5 * c + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(c), class_names, rotation=45, ha="right")
        ax.set_yticks(range(c), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (top-1 {np.trace(cm) / max(cm.sum(), 1):.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def _displayable(image: np.ndarray) -> np.ndarray:
    """A preprocessed (normalised float) or uint8 image -> float [H,W] or [H,W,3] in [0, 1]."""
    x = np.asarray(image, np.float32)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def contact_sheet(queries: Sequence[str], images: np.ndarray, top_idx: np.ndarray, out: str,
                  correct: np.ndarray | None = None) -> str:
    """One row per text query: the query, then its top-k images (top_idx [Q, k]) in rank order.
    correct [Q, k] bool (optional) frames hits green and misses red."""
    plt = _plt()
    q, k = np.asarray(top_idx).shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.5 * (k + 1) + 1.5, 1.5 * q),
                             gridspec_kw={"width_ratios": [2.5] + [1] * k}, squeeze=False)
    for r in range(q):
        axes[r, 0].axis("off")
        axes[r, 0].text(0.98, 0.5, f"\u201c{queries[r]}\u201d", ha="right", va="center", fontsize=9,
                        wrap=True, transform=axes[r, 0].transAxes)
        for j in range(k):
            ax = axes[r, j + 1]
            img = _displayable(images[top_idx[r, j]])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if correct is not None:
                color = "tab:green" if correct[r, j] else "tab:red"
                for s in ax.spines.values():
                    s.set_edgecolor(color)
                    s.set_linewidth(3)
            if r == 0:
                ax.set_title(f"#{j + 1}", fontsize=9)
    fig.suptitle("top retrieved images per text query", fontsize=11)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def caption_sheet(images: np.ndarray, captions: Sequence[str], out: str, labels: Sequence[str] | None = None,
                  columns: int = 4) -> str:
    """The generated caption under each image (images [N,H,W,C] preprocessed or uint8), with the image's label
    (e.g. its class name) when given, `columns` per row."""
    plt = _plt()
    n = len(captions)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 3.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = _displayable(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        text = f"\u201c{captions[i]}\u201d" + (f"\n(label: {labels[i]})" if labels is not None else "")
        ax.set_title(text, fontsize=8, wrap=True)
    fig.suptitle("generated captions (greedy)", fontsize=11)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out
