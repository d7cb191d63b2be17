"""The study's post-hoc lines: a finding per noise level and the report's section (its figure is
drawn by :mod:`polyak.cli.study.plots`)."""

from __future__ import annotations

from typing import Any

from polyak.cli.study.plots import POSTHOC_PNG

__all__ = ["posthoc_findings", "posthoc_section"]


def _noise(noise: str) -> str:
    return f"label noise {float(noise):.0%}"


def _pct(stat: dict[str, float]) -> str:
    return f"{stat['mean'] * 100:.1f} ± {stat['std'] * 100:.1f}%"


def _kept_gap(level: dict[str, Any]) -> str:
    """How far the averages kept directly sit from the curve (largest over runs)."""
    kept = level["kept"]
    acc = max(k["max_acc_diff"] for k in kept.values()) * 100
    nll = max(k["max_nll_diff"] for k in kept.values())
    weights = max(k["max_weights_rel_diff"] for k in kept.values())
    same = "the same test accuracy" if acc == 0 else f"test accuracy within {acc:.2g} points"
    return f"{same}, NLL within {nll:.1g}, weights within {weights:.1g} of the largest weight"


def posthoc_findings(results: dict[str, Any]) -> list[str]:
    """One line per noise level: the ``sigma_rel`` validation picks, and the check."""
    levels = results.get("posthoc") or {}
    summary = results["classification"]["summary"]
    lines = []
    for noise, level in levels.items():
        c = level["chosen"]
        best = summary[noise]["verdict"]["best_average"]
        best_acc = summary[noise]["models"][best]["acc"]["mean"] * 100
        lines.append(
            f"- **Post-hoc EMA, {_noise(noise)}.** Of the power averages reconstructed after "
            f"training (sigma_rel {level['sigma_rels'][0]}–{level['sigma_rels'][-1]}), the "
            f"validation split picks sigma_rel {c['sigma_rel']:g}: test accuracy {_pct(c['acc'])} "
            f"(live weights {c['live_acc'] * 100:.1f}%, `{best}` {best_acc:.1f}%). The averages "
            f"kept directly (sigma_rel {', '.join(level['kept'])}) sit on the curve: "
            f"{_kept_gap(level)}."
        )
    return lines


def posthoc_section(results: dict[str, Any]) -> list[str]:
    """``## Post-hoc EMA``: the method, the sweep's table, the checks, the cost, the figure."""
    levels = results.get("posthoc")
    if not levels:
        return []
    first = next(iter(levels.values()))
    runs = results["config"]["seeds"] * len(levels)
    lines = [
        "## Post-hoc EMA: sigma_rel chosen after training",
        "",
        f"Every classification run also kept a `polyak.PostHocEMA` with power averages of "
        f"sigma_rel {', '.join(first['kept'])} and wrote a float32 snapshot of them every "
        f"{first['snapshot_every']} steps (half an epoch; {first['snapshots']} snapshots). "
        "After training, `polyak.posthoc.reconstruct_many` rebuilt from those snapshots the "
        "power average of each sigma_rel below"
        + (" and of each of the study's constant decays" if first["decays"] else "")
        + ", and each was scored with its averaged BatchNorm statistics. The validation split "
        "picks sigma_rel as it picks the average (highest mean validation accuracy, then lower "
        "NLL); `fit` is the relative L2 distance between the weight profile the snapshots "
        "achieve and the target's. Mean ± std over the seeds; `*` the validation's choice, "
        "`kept` the averages kept directly.",
        "",
        "| sigma_rel | fit | "
        + " | ".join(f"{_noise(n)}: test acc (%) | NLL" for n in levels)
        + " |",
        "|---|---|" + "---|---|" * len(levels),
    ]
    for i, rel in enumerate(first["sigma_rels"]):
        tag = " (kept)" if str(rel) in first["kept"] else ""
        cells = [f"{rel:g}{tag}", f"{first['curve']['fit']['mean'][i]:.1e}"]
        for level in levels.values():
            curve, star = level["curve"], " *" if level["chosen"]["sigma_rel"] == rel else ""
            cells.append(
                f"{curve['acc']['mean'][i] * 100:.1f} ± {curve['acc']['std'][i] * 100:.1f}{star}"
            )
            cells.append(f"{curve['nll']['mean'][i]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![{POSTHOC_PNG}]({POSTHOC_PNG})", ""]
    for noise, level in levels.items():
        lines.append(
            f"- {_noise(noise).capitalize()}: the averages kept directly and their "
            f"reconstructions at the same sigma_rel agree in every run: {_kept_gap(level)}."
        )
    if first["decays"]:  # compared when the study's averages are the debiased ones
        lines += _decay_table(levels)
    seconds = [level["seconds"]["mean"] for level in levels.values()]
    lines += [
        "",
        f"Cost: {sum(seconds) / len(seconds):.1f} s per run on average over the "
        f"{runs} runs (the updates, the snapshots, then the reconstruction and scoring of "
        f"{len(first['sigma_rels']) + len(first['decays'])} averages); `--no-posthoc` skips "
        "the section.",
        "",
    ]
    return lines


def _decay_table(levels: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "The study's constant-decay averages (debiased), kept directly during training and "
        "reconstructed from the same snapshots (largest difference in one run; the wide "
        "profiles are the hardest to fit from snapshots of power averages):",
        "",
        "| average | noise | profile's sigma_rel | fit | test acc kept / reconstructed (%) "
        "| largest gap (points) | NLL kept / reconstructed |",
        "|---|---|---|---|---|---|---|",
    ]
    for noise, level in levels.items():
        for name, d in level["decays"].items():
            lines.append(
                f"| `{name}` | {float(noise):.0%} | {d['sigma_rel']:.3f} | "
                f"{d['fit']['mean']:.1e} | {d['kept']['acc']['mean'] * 100:.2f} / "
                f"{d['reconstructed']['acc']['mean'] * 100:.2f} | {d['max_acc_diff'] * 100:.2f} "
                f"| {d['kept']['nll']['mean']:.4f} / {d['reconstructed']['nll']['mean']:.4f} |"
            )
    return lines
