"""The study's methods section: summary over seeds, choices on validation, report text.

What the papers lead us to expect was written down before the first run (it is printed with
every report, whatever the numbers say):

* BEMA (Block & Zhang 2025): closer to the live weights than the plain EMA early in training
  (the correction removes the lag), and no worse at the end.
* SWAG (Maddox et al. 2019): lower NLL and ECE than the SWA mean it is centred on.
* Write-back (Switch EMA, Li et al. 2024; PMA, Li et al. 2025): the direction is contested
  (Morales-Brotons et al. 2024, App. C, found per-epoch copy-back hurt), so no expectation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polyak.cli.study.classify import LIVE
from polyak.cli.study.methods import BEMAS, SCALES, WRITE_BACKS

__all__ = ["EXPECTED", "methods_findings", "methods_section", "summarise_methods"]

EXPECTED = {
    "bema": "closer to the live weights than the plain EMA in the first epochs, and no worse "
    "accuracy or NLL at the end",
    "swag": "lower NLL and ECE than the SWA mean",
    "write-back": "contested: Switch EMA reports gains, Morales-Brotons et al. (App. C) found "
    "per-epoch copy-back hurt; no expectation",
}
METRICS = ("acc", "nll", "ece", "val_acc", "val_nll")
EARLY = 3  # epochs that count as "early in training"


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std())}


def _row(scores: list[dict[str, float]]) -> dict[str, Any]:
    return {k: _stats([s[k] for s in scores]) for k in METRICS}


def _pick(rows: dict[str, dict[str, Any]], by: str) -> str:
    """The variant with the best mean validation ``by`` (acc: highest, then lower NLL; nll:
    lowest)."""
    if by == "acc":
        return max(
            rows, key=lambda n: (round(rows[n]["val_acc"]["mean"], 12), -rows[n]["val_nll"]["mean"])
        )
    return min(rows, key=lambda n: rows[n]["val_nll"]["mean"])


def summarise_methods(
    runs: list[dict[str, Any]], write_back: list[dict[str, Any]], level: dict[str, Any]
) -> dict[str, Any]:
    """One noise level: each method's variants over seeds, the variant chosen on validation,
    and the rows compared with the live weights and the study's chosen plain average.

    ``level``: this noise level's classification summary (``summarise_noise_level``)."""
    parts = [r["methods"] for r in runs]
    bema = {n: _row([p[n] for p in parts]) for n in BEMAS}
    swag = {f"swag {s:g}": _row([p[f"swag {s:g}"] for p in parts]) for s in SCALES}
    wb = {
        v: _row([r["final"] for r in write_back if r["variant"] == v])
        for v in WRITE_BACKS
        if any(r["variant"] == v for r in write_back)
    }
    models = level["models"]
    plain = level["verdict"]["best_average"]
    chosen = {
        "bema": _pick(bema, "acc"),
        "swag": _pick(swag, "nll"),  # SWAG is for calibration: its scale is chosen on NLL
        **({"write-back": _pick(wb, "acc")} if wb else {}),
    }
    rows = {
        "live": {k: models[LIVE][k] for k in METRICS},
        f"plain EMA ({plain})": {k: models[plain][k] for k in METRICS},
        f"BEMA ({chosen['bema']})": bema[chosen["bema"]],
        "SWA mean": _row([p["swa mean"] for p in parts]),
        f"SWAG ({chosen['swag']})": swag[chosen["swag"]],
    }
    if wb:
        rows[f"write-back ({chosen['write-back']})"] = wb[chosen["write-back"]]
    plain_name = plain.removesuffix(" +bn")
    distance = {
        n: np.mean([p["distance"][n] for p in parts], 0).tolist() for n in parts[0]["distance"]
    }
    return {
        "expected": EXPECTED,
        "variants": {"bema": bema, "swag": swag, "write-back": wb},
        "chosen": chosen,
        "plain": plain,
        "rows": rows,
        "distance": distance,
        "early": {
            "bema": float(np.mean(distance[chosen["bema"]][:EARLY])),
            "plain": float(np.mean(distance[plain_name][:EARLY])),
            "plain_name": plain_name,
        },
        "collected": parts[0]["collected"],
    }


def _outcome(s: dict[str, Any], noise: str) -> list[str]:
    rows = s["rows"]
    name = {k.split(" (")[0]: k for k in rows}
    plain, bema, swa, swag = (
        rows[name["plain EMA"]], rows[name["BEMA"]], rows[name["SWA mean"]], rows[name["SWAG"]]
    )  # fmt: skip
    out = []
    e = s["early"]
    closer = e["bema"] < e["plain"]
    no_worse = bema["acc"]["mean"] >= plain["acc"]["mean"] - plain["acc"]["std"]
    out.append(
        f"noise {float(noise):.0%}, BEMA ({s['chosen']['bema']}): relative distance to the live "
        f"weights over epochs 1-{EARLY} {e['bema']:.4f} vs {e['plain']:.4f} for {e['plain_name']} "
        f"({'closer, as expected' if closer else 'not closer: the expectation failed'}); final "
        f"accuracy {bema['acc']['mean']:.4f} vs {plain['acc']['mean']:.4f} "
        f"({'no worse within one std' if no_worse else 'worse'}), NLL {bema['nll']['mean']:.3f} "
        f"vs {plain['nll']['mean']:.3f}."
    )
    better = swag["nll"]["mean"] < swa["nll"]["mean"] and swag["ece"]["mean"] < swa["ece"]["mean"]
    out.append(
        f"noise {float(noise):.0%}, SWAG ({s['chosen']['swag']}, {s['collected']} models "
        f"collected): NLL {swag['nll']['mean']:.3f} vs {swa['nll']['mean']:.3f} for the SWA mean, "
        f"ECE {swag['ece']['mean']:.4f} vs {swa['ece']['mean']:.4f} "
        f"({'both lower, as expected' if better else 'not both lower: the expectation failed'})."
    )
    if "write-back" in s["chosen"]:
        wb = rows[name["write-back"]]
        live = rows["live"]
        out.append(
            f"noise {float(noise):.0%}, write-back ({s['chosen']['write-back']}): accuracy "
            f"{wb['acc']['mean']:.4f} vs {live['acc']['mean']:.4f} live and "
            f"{plain['acc']['mean']:.4f} for the plain EMA, NLL {wb['nll']['mean']:.3f} vs "
            f"{live['nll']['mean']:.3f} live ("
            + ("helped" if wb["acc"]["mean"] > live["acc"]["mean"] else "did not help")
            + " against the live weights)."
        )
    return out


def methods_findings(results: dict[str, Any]) -> list[str]:
    """One line per method and noise level: what was expected against what happened."""
    levels = results.get("methods") or {}
    return [f"- {line}" for noise, s in levels.items() for line in _outcome(s, noise)]


def methods_section(results: dict[str, Any]) -> list[str]:
    """The report's section: the expectations and the table per noise level (the outcomes are
    :func:`methods_findings`, listed with the report's findings)."""
    levels = results.get("methods")
    if not levels:
        return []
    lines = ["", "## Beyond the plain EMA: BEMA, SWAG, write-back", ""]
    lines.append("Expected before running (from the papers):")
    lines += [f"- {k}: {v}." for k, v in EXPECTED.items()]
    lines += [
        "",
        "Each method's variant is chosen on the validation split (BEMA and write-back on "
        "accuracy, SWAG's scale on NLL); BatchNorm statistics are recomputed for BEMA, the SWA "
        "mean and every SWAG draw. Test metrics, mean ± std over seeds:",
    ]
    for noise, s in levels.items():
        lines += ["", f"Noise {float(noise):.0%}:", ""]
        lines += ["| model | accuracy | NLL | ECE | val accuracy |", "|---|---|---|---|---|"]
        for name, row in s["rows"].items():
            lines.append(
                f"| {name} | {row['acc']['mean']:.4f} ± {row['acc']['std']:.4f} | "
                f"{row['nll']['mean']:.3f} ± {row['nll']['std']:.3f} | "
                f"{row['ece']['mean']:.4f} ± {row['ece']['std']:.4f} | "
                f"{row['val_acc']['mean']:.4f} |"
            )
    lines += ["", "What happened against these expectations is listed under Findings.", ""]
    return lines
