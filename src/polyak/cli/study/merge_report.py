"""The study's "merge instead of decay" lines: a finding and the report's section
(:mod:`polyak.cli.study.merge_decay` runs it)."""

from __future__ import annotations

from typing import Any

from polyak.cli.study.merge_decay import DECAY_SHARE, EXPECTATION

__all__ = ["merge_findings", "merge_section"]


def _verdict(m: dict[str, Any]) -> str:
    gaps = ", ".join(f"{g:+.2f}" for g in m["gaps_points"])
    return (
        f"the merge chosen on validation, `{m['chosen']}`, was within 0.5 points of the decayed "
        f"run (or better) on {m['seeds_within']} of {m['seeds']} seeds (test accuracy minus the "
        f"decayed run's, per seed: {gaps} points): the expectation was "
        f"{'met' if m['met'] else '**not met**'}"
    )


def merge_findings(results: dict[str, Any]) -> list[str]:
    m = results.get("merge")
    if not m:
        return []
    text = _verdict(m)
    return [f"- **Merge instead of decay.** {text[0].upper()}{text[1:]}."]


def merge_section(results: dict[str, Any]) -> list[str]:
    """``## Merge instead of decay``: the protocol, the expectation, the table, the verdict."""
    m = results.get("merge")
    if not m:
        return []
    first = m["first"]
    lines = [
        "## Merge instead of decay",
        "",
        f"Each seed's model was trained on the {m['noise']:.0%}-noise split with the study's "
        f"optimizer at the constant peak learning rate; after {1 - DECAY_SHARE:.0%} of the "
        f"{first['steps']} steps the run forked. One branch kept the rate constant and saved a "
        f"checkpoint every {first['every']} steps ({first['checkpoints']} in all, from two "
        "windows before the fork); the other decayed it linearly to zero over the last "
        f"{first['window']} steps (same data order, same number of steps). The constant "
        "branch's checkpoints were merged by `polyak.merge` from safetensors files: WSM's "
        "weights for that linear decay, LAWA over the window, and EMA-equivalent weights (`fit`: "
        "the largest gap between the cumulative weights the checkpoints give and the EMA's). "
        "The merge compared with the decayed run is chosen on the validation split (highest "
        "mean validation accuracy, then lower NLL); `*` marks it. Mean ± std over the seeds.",
        "",
        f"{EXPECTATION}",
        "",
        "| weights | test acc (%) | test NLL | validation acc (%) |",
        "|---|---|---|---|",
    ]
    for name, row in m["table"].items():
        star = " *" if name == m["chosen"] else ""
        lines.append(
            f"| {name}{star} | {row['acc']['mean'] * 100:.2f} ± {row['acc']['std'] * 100:.2f} "
            f"| {row['nll']['mean']:.3f} | {row['val_acc']['mean'] * 100:.2f} |"
        )
    lines += [
        "",
        f"What happened: {_verdict(m)}. Cost: {m['seconds']:.1f} s per seed (both branches, "
        "the merges and their scoring); `--no-merge` skips the section.",
        "",
    ]
    return lines
