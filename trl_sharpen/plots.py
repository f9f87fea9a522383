"""PNG plots of a `SharpeningReport`, the views of Huang et al. (2025):

- `plot_accuracy_vs_n`: accuracy against the number of samples n (Fig. 2 / App. A.1): the greedy baseline, one
  Best-of-n curve per self-reward and the pass@n coverage skyline. Where a BoN curve ends above the greedy line,
  inference-time sharpening helps; the distance to pass@n is what a better verifier could still gain.
- `plot_loglik_histogram`: base log-likelihood of correct against incorrect samples (Fig. 1c / Fig. 6). When the
  correct samples sit to the right, log pi_base is informative and maximum-likelihood sharpening can help.

matplotlib is optional (`pip install "trl-sharpen[plots]"`): it is imported only when a plot is drawn, and only its
object-oriented API is used, so no GUI backend or global pyplot state is involved.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .report import SharpeningReport


def _new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            'Plotting needs matplotlib: pip install "trl-sharpen[plots]" (or pip install matplotlib).'
        ) from error
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _short_name(report: SharpeningReport) -> str:
    name = report.model_name or "model"
    parts = Path(name).parts
    # A local checkpoint path is long and uninformative at its root: keep its last two components.
    return "/".join(parts[-2:]) if len(parts) > 2 else name


def plot_accuracy_vs_n(
    report: SharpeningReport,
    path: str | os.PathLike,
    title: str | None = None,
    reference_lines: dict[str, float] | None = None,
) -> Path:
    """Accuracy against n (log2 axis): greedy (horizontal line), BoN@n per self-reward, pass@n (dashed).

    `reference_lines` adds one horizontal line per entry, e.g. the greedy accuracy of sharpened models, which should
    reach the Best-of-N curve (sharpening amortises BoN into greedy decoding)."""
    figure = _new_figure(6.4, 4.4)
    axes = figure.add_subplot()
    ns = report.ns
    markers = ["o", "s", "^", "D", "v", "P"]
    for index, (reward, curve) in enumerate(report.best_of_n.items()):
        # Self-rewards often pick the same samples: shrink each later curve so that coinciding ones stay visible.
        axes.plot(
            ns,
            [curve[n] for n in ns],
            marker=markers[index % len(markers)],
            markersize=max(4.0, 10.0 - 2.5 * index),
            linewidth=max(1.2, 3.5 - index),
            alpha=0.85,
            label=f"BoN@n, {reward}",
        )
    axes.plot(ns, [report.pass_at_n[n] for n in ns], "k--", marker="x", label="pass@n (oracle coverage)")
    axes.axhline(
        report.greedy.accuracy,
        color="tab:red",
        linestyle=":",
        linewidth=2,
        label=f"greedy{' (base)' if reference_lines else ''} ({report.greedy.accuracy:.3f})",
    )
    for index, (label, accuracy) in enumerate((reference_lines or {}).items()):
        axes.axhline(
            accuracy,
            color=f"C{index + 4}",
            linestyle=(0, (5, 2 + index)),
            linewidth=1.6,
            label=f"{label} ({accuracy:.3f})",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(ns, [str(n) for n in ns])
    axes.minorticks_off()
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("n (samples per prompt; n < N by exact subsampling)")
    axes.set_ylabel("accuracy")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    axes.set_title(
        title or f"{_short_name(report)}: accuracy vs n ({report.num_prompts} prompts, N = {report.num_samples})",
        fontsize="medium",
    )
    return _save(figure, path)


def plot_loglik_histogram(
    report: SharpeningReport, path: str | os.PathLike, title: str | None = None, bins: int = 40
) -> Path:
    """Histograms (as densities, so a rare class stays visible) of log pi_base(y|x) of correct and incorrect samples,
    with each class's mean (over all its samples) marked."""
    if report.samples is None:
        raise ValueError("The report carries no samples to plot (it was not produced by evaluate_sharpening).")
    base_logprobs = np.asarray(report.samples.base_logprobs, dtype=np.float64).ravel()
    correct = np.asarray(report.samples.correct, dtype=bool).ravel()
    # A few degenerate samples (very long or garbled) can sit far in the left tail and squeeze the bulk of both
    # distributions into a few bins: bin the central 99.5% and say how many samples fell outside.
    low = float(np.quantile(base_logprobs, 0.005))
    edges = np.histogram_bin_edges(base_logprobs[base_logprobs >= low], bins=bins)
    hidden = int((base_logprobs < low).sum())
    figure = _new_figure(6.4, 4.4)
    axes = figure.add_subplot()
    for mask, label, color in ((correct, "correct", "tab:green"), (~correct, "incorrect", "tab:red")):
        if not mask.any():
            continue
        values = base_logprobs[mask]
        axes.hist(values, bins=edges, density=True, alpha=0.5, color=color, label=f"{label} ({mask.sum()} samples)")
        axes.axvline(values.mean(), color=color, linestyle="--", linewidth=1.5)
    note = f"\n{hidden} samples below {low:.1f} not shown" if hidden else ""
    axes.set_xlabel("log π_base(y|x) of the sample")
    axes.set_ylabel("density")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small", title=f"dashed lines: class means{note}", title_fontsize="small")
    axes.set_title(
        title or f"{_short_name(report)}: base log-likelihood of correct vs incorrect samples", fontsize="medium"
    )
    return _save(figure, path)


PLOT_FILES = ("accuracy_vs_n.png", "loglik_histogram.png")  # what `save_plots` may write


def save_plots(report: SharpeningReport, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `accuracy_vs_n.png` and `loglik_histogram.png` (when the report has samples) under `output_dir`."""
    output_dir = Path(output_dir)
    paths = {"accuracy_vs_n": plot_accuracy_vs_n(report, output_dir / "accuracy_vs_n.png")}
    if report.samples is not None:
        paths["loglik_histogram"] = plot_loglik_histogram(report, output_dir / "loglik_histogram.png")
    return paths


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


__all__ = ["plot_accuracy_vs_n", "plot_loglik_histogram", "save_plots"]
