"""Print the README's "choosing a horizon" table, computed by polyak's own conversions.

python examples/horizon_table.py          # the Markdown tables quoted in the README
"""

from __future__ import annotations

import argparse

from polyak import schedules

DECAYS = (0.99, 0.998, 0.999, 0.9995, 0.9999, 0.99999)
RUN_LENGTHS = (10_000, 100_000, 1_000_000)
SIGMA_RELS = (0.01, 0.05, 0.09, 0.10, 0.15, 0.20, 0.25)


def decay_table() -> str:
    head = "| decay | half-life (steps) | mean age (steps) | " + " | ".join(
        f"σ_rel after {n:,} steps" for n in RUN_LENGTHS
    )
    lines = [head + " |", "|" + "---|" * (3 + len(RUN_LENGTHS))]
    for d in DECAYS:
        cells = [
            f"{d:g}",
            f"{schedules.decay_to_halflife(d):,.0f}",
            f"{d / (1 - d):,.0f}",
            *(_sigma_cell(schedules.decay_to_sigma_rel(d, n)) for n in RUN_LENGTHS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\n— the window is longer than the run (σ_rel above the uniform average's 0.289): "
        "the average still remembers the initial weights."
    )
    return "\n".join(lines)


def _sigma_cell(sigma_rel: float) -> str:
    return "—" if sigma_rel > 12**-0.5 else f"{sigma_rel:.3g}"


def power_table() -> str:
    lines = [
        "| σ_rel | γ (power) | equivalent constant decay after 100,000 steps |",
        "|---|---|---|",
    ]
    for s in SIGMA_RELS:
        g = schedules.sigma_rel_to_gamma(s)
        d = schedules.sigma_rel_to_decay(s, 100_000)
        lines.append(f"| {s:g} | {g:.2f} | {d:.6f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="(no effect: this script is instant)")
    parser.parse_args(argv)
    text = decay_table() + "\n\n" + power_table()
    print(text)
    return text


if __name__ == "__main__":
    main()
