"""The study's figures (PNG), each readable without the code: a title, labelled axes with units,
a legend that explains every mark (and sits outside the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polyak import metrics
from polyak.cli.study.classify import LIVE

__all__ = ["POSTHOC_PNG", "write_plots"]

_DPI = 110
POSTHOC_PNG = "posthoc.png"


def _noise(noise: str) -> str:
    return f"{float(noise):.0%} label noise"


def _accuracy_per_epoch(plt: Any, results: dict[str, Any], path: Path) -> None:
    summary = results["classification"]["summary"]
    seeds = results["config"]["seeds"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (noise, level) in zip(axes[0], summary.items()):
        for m, r in level["models"].items():
            if "curve_mean" not in r:
                continue
            y, s = np.array(r["curve_mean"]) * 100, np.array(r["curve_std"]) * 100
            x = np.arange(1, len(y) + 1)
            (line,) = ax.plot(
                x, y, lw=2.5 if m == LIVE else 1.5, color="k" if m == LIVE else None, label=m
            )
            ax.fill_between(x, y - s, y + s, alpha=0.15, color=line.get_color(), lw=0)
            handles.setdefault(m, line)
        ax.set(title=_noise(noise), xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    from matplotlib.patches import Patch

    band = Patch(color="grey", alpha=0.3, label=f"± 1 std over {seeds} seeds")
    fig.legend(
        [*handles.values(), band],
        [*handles, band.get_label()],
        loc="lower center",
        ncol=len(handles) + 1,
        frameon=False,
    )
    fig.suptitle(
        f"Test accuracy after each epoch: live weights vs averages (mean of {seeds} seeds)"
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _reliability(
    plt: Any, reliability: dict[str, Any], results: dict[str, Any], path: Path
) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    labels = reliability["labels"]
    bins_n = results["config"]["ece_bins"]
    for m, probs in reliability["probabilities"].items():
        bins = metrics.calibration_bins(probs, labels, n_bins=bins_n, binning="equal_mass")
        keep = bins.count > 0
        ece = metrics.ece(probs, labels, n_bins=bins_n, binning="equal_mass")
        ax.plot(bins.confidence[keep], bins.accuracy[keep], "o-", label=f"{m} (ECE {ece:.3f})")
    ax.set(
        xlabel=f"mean confidence in bin ({bins_n} equal-mass bins)",
        ylabel="accuracy in bin",
        title=f"Reliability: {results['dataset']['name']} test set,\n"
        f"clean labels, seed {reliability['seed']}",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    ax.text(0.98, 0.04, "below the diagonal:\noverconfident", ha="right", va="bottom")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _seed_agreement(plt: Any, results: dict[str, Any], path: Path) -> None:
    summary = results["classification"]["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.4), squeeze=False)
    for ax, (noise, level) in zip(axes[0], summary.items()):
        models = level["models"]
        names = list(models)
        mean = np.array([models[m]["agreement"]["mean"] for m in names]) * 100
        std = np.array([models[m]["agreement"]["std"] for m in names]) * 100
        pairs = models[LIVE]["agreement"]["n"]
        x = np.arange(len(names))
        ax.axhline(mean[0], color="k", lw=1, ls="--", label="live weights' level")
        err = std if pairs > 1 else None
        what = f"mean ± std over {pairs} pairs of seeds" if pairs > 1 else "one pair of seeds"
        ax.errorbar(x, mean, yerr=err, fmt="o", capsize=4, label=what)
        ax.set_xticks(x, names, rotation=30, ha="right")
        pad = max(0.5, 0.15 * (mean.max() - mean.min()))
        ax.set_ylim(mean.min() - pad - (std.max() if err is not None else 0), mean.max() + 2 * pad)
        ax.set(title=_noise(noise), ylabel="test predictions agreeing between seeds (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle("Agreement between seeds (y-axis zoomed to the differences)")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _regression(plt: Any, reg: dict[str, Any], path: Path) -> None:
    settings = reg["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], settings.items()):
        live, ema = np.array(s["rmse_live"]), np.array(s["rmse_ema"])
        lo, hi = min(live.min(), ema.min()), max(live.max(), ema.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1,
                label="y = x: no change (below: the average is better)")  # fmt: skip
        ax.scatter(
            live, ema, label=f"one train/test split ({s['ema_wins']} of {s['splits']} below)"
        )
        ax.set(
            title=f"{name}: {s['epochs']} epochs, {s['relative_change'] * 100:+.1f}% on average",
            xlabel="test RMSE, live weights (disease-progression units)",
            ylabel="test RMSE, averaged weights",
            xlim=(lo - pad, hi + pad),
            ylim=(lo - pad, hi + 3 * pad),
        )
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Diabetes regression: EMA of the weights, decay {reg['decay']} per step (debiased)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _posthoc(plt: Any, results: dict[str, Any], path: Path) -> None:
    """Test accuracy and NLL against sigma_rel: the reconstructed sweep, the averages kept
    directly, the live weights and the validation's choice."""
    levels, summary = results["posthoc"], results["classification"]["summary"]
    seeds = results["config"]["seeds"]
    fig, axes = plt.subplots(2, len(levels), figsize=(5.5 * len(levels), 7.6), squeeze=False)
    rows = (("acc", 100, "test accuracy (%)"), ("nll", 1, "test NLL (nats per image)"))
    for col, (noise, level) in enumerate(levels.items()):
        x = np.array(level["sigma_rels"])
        chosen = level["chosen"]["sigma_rel"]
        for row, (key, scale, label) in enumerate(rows):
            ax = axes[row][col]
            y = np.array(level["curve"][key]["mean"]) * scale
            s = np.array(level["curve"][key]["std"]) * scale
            ax.plot(x, y, "o-", ms=3.5, color="C0", label="reconstructed from the snapshots")
            ax.fill_between(x, y - s, y + s, color="C0", alpha=0.15, lw=0)
            kept = level["kept"]
            ax.plot([float(k) for k in kept], [v[key]["mean"] * scale for v in kept.values()],
                    "s", ms=11, mfc="none", mew=1.8, color="C1",
                    label="kept directly during training")  # fmt: skip
            live = summary[noise]["models"][LIVE][key]["mean"] * scale
            ax.axhline(live, color="k", ls="--", lw=1, label="live weights")
            ax.axvline(chosen, color="C2", ls=":", lw=2,
                       label="sigma_rel chosen on the validation split")  # fmt: skip
            ax.set(xscale="log", ylabel=label)
            ticks = [v for v in (0.01, 0.02, 0.05, 0.1, 0.2, 0.28) if x[0] <= v <= x[-1]]
            ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
            ax.minorticks_off()
            ax.set_xlabel("sigma_rel (EDM2 relative width of the power average)")
            ax.set_title(f"{_noise(noise)}: {'accuracy' if key == 'acc' else 'NLL'}")
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles.append(Patch(color="C0", alpha=0.3))
    labels.append(f"± 1 std over {seeds} seeds")
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(
        "Post-hoc EMA: averages of every sigma_rel reconstructed after training\n"
        f"(mean of {seeds} seeds; {level['snapshots']} snapshots of sigma_rel "
        f"{', '.join(level['kept'])} per run)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def write_plots(results: dict[str, Any], reliability: dict[str, Any], out: Path) -> list[str]:
    """Accuracy per epoch, reliability diagram, seed agreement, regression RMSE, the post-hoc
    sweep (PNG files in ``out``); returns their file names.

    ``reliability``: ``{"labels", "probabilities": {model: probs}, "seed"}`` of one clean run, or
    empty to skip that figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = ["accuracy_per_epoch.png"]
    _accuracy_per_epoch(plt, results, out / files[-1])
    if reliability:
        files.append("reliability.png")
        _reliability(plt, reliability, results, out / files[-1])
    files.append("seed_agreement.png")
    _seed_agreement(plt, results, out / files[-1])
    if results.get("regression"):
        files.append("regression.png")
        _regression(plt, results["regression"], out / files[-1])
    if results.get("posthoc"):
        files.append(POSTHOC_PNG)
        _posthoc(plt, results, out / files[-1])
    return files
