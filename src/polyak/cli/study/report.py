"""The study's outputs: the terminal table, the goals and ``report.md`` (figures: ``plots``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polyak.cli.study.merge_report import merge_findings, merge_section
from polyak.cli.study.methods_report import methods_findings, methods_section
from polyak.cli.study.plots import POSTHOC_PNG
from polyak.cli.study.posthoc_report import posthoc_findings, posthoc_section

__all__ = ["findings", "format_table", "provenance", "targets", "write_report"]

COLUMNS = (
    ("final acc", "acc", 100, "max"),
    ("best-epoch acc", "best_epoch_acc", 100, "max"),
    ("NLL", "nll", 1, "min"),
    ("ECE", "ece", 100, "min"),
    ("memorised", "memorised", 100, "min"),
    ("seed agreement", "agreement", 100, "max"),
)


def _cell(stat: dict[str, float] | None, scale: float) -> str:
    """``mean ± std``; the mean alone where one value has no spread (two seeds: one pair)."""
    if stat is None or math.isnan(stat["mean"]):
        return "—"
    digits = 1 if scale == 100 else 3
    if stat.get("n", 2) < 2:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def format_table(summary: dict[str, Any], markdown: bool = False) -> str:
    """Per noise level: live vs each average, mean ± std over seeds; ``*`` marks the winner."""
    out = []
    for noise, level in summary.items():
        models = level["models"]
        header = ["weights", *(c[0] for c in COLUMNS)]
        rows = []
        winners = {}
        for _, key, _, better in COLUMNS:
            vals = {m: r[key]["mean"] for m, r in models.items() if key in r}
            vals = {m: v for m, v in vals.items() if not math.isnan(v)}
            if vals:
                winners[key] = (max if better == "max" else min)(vals, key=lambda m: vals[m])
        for m, r in models.items():
            cells = [m]
            for _, key, scale, _ in COLUMNS:
                cell = _cell(r.get(key), scale)
                cells.append(cell + (" *" if winners.get(key) == m else ""))
            rows.append(cells)
        title = f"label noise {float(noise):.0%}"
        if markdown:
            out.append(f"**{title}** (accuracy, ECE, memorised and agreement in %)\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(c) + " |" for c in rows]
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            out.append(f"{title}  (accuracy, ECE, memorised and agreement in %; * = best)")
            for line in [header, *rows]:
                out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        out.append("")
    return "\n".join(out)


def findings(results: dict[str, Any]) -> list[str]:
    lines = []
    for noise, level in results["classification"]["summary"].items():
        v = level["verdict"]
        gain = v["final_acc_gain"] * 100
        lines.append(
            f"- **Label noise {float(noise):.0%}.** The average chosen on the validation split "
            f"(`{v['best_average']}`) {'beat' if gain > 0 else 'did not beat'} the live weights' "
            f"final test accuracy ({gain:+.1f} points), winning {v['seeds_won']} of "
            f"{v['seeds']} seeds. At the best epoch chosen on the validation split, "
            f"`{v['best_epoch_average']}` was {v['best_epoch_acc_gain'] * 100:+.1f} points from "
            f"the live weights' best epoch (epochs chosen: live {v['best_epoch_live']}, average "
            f"{v['best_epoch_best_average']}). ECE {v['ece_ratio']:.2f}x the live weights', "
            f"NLL {v['nll_change']:+.3f}, agreement between seeds "
            f"{v['agreement_gain'] * 100:+.1f} points."
        )
    lines += posthoc_findings(results)
    lines += methods_findings(results)
    lines += merge_findings(results)
    reg = results.get("regression")
    if reg:
        for name, s in reg["settings"].items():
            lines.append(
                f"- **Regression, {name}.** Averaged weights (decay {reg['decay']}) changed the "
                f"test RMSE by {s['relative_change'] * 100:+.1f}% on average and were better on "
                f"{s['ema_wins']} of {s['splits']} splits."
            )
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The goals set for the default protocol, what this run measured, and whether it met them.

    They were set from a prototype on Fashion-MNIST (10k/5k, BN-MLP, 15 epochs, 3 seeds) and
    are only meaningful for that protocol (``results["default_protocol"]``); the gains compare
    the live weights with the average chosen on the validation split.
    """
    rows: list[tuple[str, str, str, bool]] = []
    summary = results["classification"]["summary"]
    noisy = summary.get("0.4", {}).get("verdict")
    clean = summary.get("0.0", {}).get("verdict")
    if noisy:
        g, won, n = noisy["final_acc_gain"] * 100, noisy["seeds_won"], noisy["seeds"]
        rows.append(
            (
                "40% noise: final accuracy, every seed winning",
                ">= +8 points",
                f"{g:+.1f} points, {won}/{n} seeds",
                g >= 8 and won == n,
            )
        )
        g = noisy["best_epoch_acc_gain"] * 100
        rows.append(("40% noise: best-epoch accuracy", ">= +1.5 points", f"{g:+.1f}", g >= 1.5))
        g = noisy["agreement_gain"] * 100
        rows.append(("40% noise: seed agreement", ">= +10 points", f"{g:+.1f}", g >= 10))
    if clean:
        g = clean["final_acc_gain"] * 100
        rows.append(("clean: final accuracy", ">= +0.5 points", f"{g:+.1f}", g >= 0.5))
        r, d = clean["ece_ratio"], clean["nll_change"]
        rows.append(
            (
                "clean: ECE and NLL",
                "ECE <= 0.75x, lower NLL",
                f"{r:.2f}x, NLL {d:+.3f}",
                r <= 0.75 and d < 0,
            )
        )
        g = clean["agreement_gain"] * 100
        rows.append(("clean: seed agreement", ">= +1.5 points", f"{g:+.1f}", g >= 1.5))
    reg = (results.get("regression") or {}).get("settings", {}).get("over-trained")
    if reg:
        c, w, n = -reg["relative_change"] * 100, reg["ema_wins"], reg["splits"]
        rows.append(
            (
                "regression, over-trained: RMSE lower, splits won",
                ">= 2% lower, >= 8 of 10",
                f"{c:.1f}% lower, {w} of {n}",
                c >= 2 and w >= 0.8 * n,
            )
        )
    return rows  # fmt: skip


METHOD = """\
**How the average is judged.** Every run keeps three averages (and each again with BatchNorm
statistics recomputed, `+bn`). The average compared with the live weights is chosen on the
validation split (10% of the training set, with its noisy labels under label noise), never on the
test set: the highest mean final validation accuracy over the seeds, ties broken by the lower
validation NLL. Each run's best epoch is likewise the epoch of its highest validation accuracy.
The test set only reports what those choices give.

**Reproducibility.** A run is deterministic on one machine (same CPU, same library versions), but
not across CPUs: the BLAS kernels torch picks differ, so the last digits, and a goal near its
threshold, can differ on another CPU. Seeds vary initialisation and batch order
(`--first-seed`); the data split and the flipped labels stay fixed.
"""

CAVEATS = """\
- Under label noise the test set keeps its clean labels. ECE then punishes a model that did *not*
  memorise the noise: it is less confident than a model that learnt the noisy labels would be, yet
  it is compared with clean accuracy. Read NLL under noise; ECE is meaningful for clean labels.
- The validation split carries the same label noise as the training set; under 40% noise its
  accuracy is lower than the test accuracy, but it still ranks models by how little noise they fit.
- The averages keep averaged BatchNorm statistics (EMAN); rows marked `+bn` recompute them on the
  training inputs after training (torch `update_bn` semantics).
- The claim that motivated the regression task, "EMA with decay 0.999 gives 2–5% lower RMSE on
  C-MAPSS", cannot be checked offline (the data is not available here, and no published source
  was found for it). The diabetes task measures the same kind of claim on data that ships with
  scikit-learn.
- Small models, few seeds: these are demonstrations of the effects, with their spread, not
  benchmarks.
"""


def _goals(results: dict[str, Any]) -> list[str]:
    if not results.get("default_protocol"):
        return [
            "Not graded: the goals were set for the default protocol (Fashion-MNIST 10k/5k, "
            "BN-MLP, 15 epochs, 3 seeds, 0% and 40% noise, 10 regression splits) and this run "
            "used another one.",
        ]
    return [
        "Set from a prototype on Fashion-MNIST (10k/5k, BN-MLP, 15 epochs, 3 seeds); the gains "
        "compare the live weights with the average chosen on the validation split. Nothing in "
        "the code is tuned to them.",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
        *(f"| {g} | {t} | {m} | {'yes' if ok else '**no**'} |" for g, t, m, ok in targets(results)),
    ]


def provenance(results: dict[str, Any]) -> list[str]:
    """The report lines saying where and how it ran, and the command that reproduces it."""
    cfg, m = results["config"], results["machine"]
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {results['versions']['torch']}; "
        f"{cfg['workers']} worker processes of {cfg['threads']} thread(s). "
        f"Wall time: {results['wall_time_s']:.0f} s, load average "
        f"{'/'.join(f'{x:.2f}' for x in m.get('load') or []) or 'not reported'} at the start "
        "(the time depends on the machine and on what else runs; it is reported, not graded).  ",
        f"Reproduce with `{results['command']}`.",
    ]


def write_report(results: dict[str, Any], plots: list[str], out: Path) -> Path:
    """``report.md``: the protocol, the method, the findings, the goals, the tables, the plots
    and the caveats."""
    cfg, ds = results["config"], results["dataset"]
    lines = [
        "# What averaging the weights bought",
        "",
        f"Data: {ds['message']}  ",
        f"Protocol: {cfg['model']} model, SGD with Nesterov momentum {cfg['momentum']}, "
        f"learning rate {cfg['lr']} with a cosine schedule, weight decay {cfg['weight_decay']}, "
        f"batch {cfg['batch_size']}, {cfg['epochs']} epochs, seeds {cfg['first_seed']}–"
        f"{cfg['first_seed'] + cfg['seeds'] - 1}, label noise "
        f"{', '.join(f'{n:.0%}' for n in cfg['noise'])}. Averages: "
        f"{', '.join(str(d) for d in cfg['decays'])} per step ({cfg['average']}).  ",
        *provenance(results),
        "",
        METHOD,
        "## Findings",
        "",
        *findings(results),
        "",
        "## Against the goals set for the default protocol",
        "",
        *_goals(results),
        "",
        "## Results",
        "",
        format_table(results["classification"]["summary"], markdown=True),
        *(f"![{p}]({p})\n" for p in plots if p != POSTHOC_PNG),
        *posthoc_section(results),
        *methods_section(results),
        *merge_section(results),
        "## Caveats",
        "",
        CAVEATS,
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
