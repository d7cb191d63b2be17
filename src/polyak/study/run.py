"""``polyak study``: measure on real data what averaging the weights buys (or does not).

Trains a small network several times per label-noise level, keeping three averages of the
weights, and compares them with the live weights: final and best-epoch accuracy, NLL, ECE,
memorisation of noisy labels and agreement between seeds; plus a regression task. Writes
``results.json``, PNG plots and ``report.md`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polyak
from polyak.study.classify import LIVE, make_split, train_run
from polyak.study.config import StudyConfig
from polyak.study.data import resolve_dataset
from polyak.study.regression import run_regression
from polyak.study.report import findings, format_table, write_plots, write_report
from polyak.study.summary import summarise_noise_level
from polyak.workflows._progress import Progress

__all__ = ["run_study"]


def _command(cfg: StudyConfig) -> str:
    defaults = StudyConfig()
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple):
                flags.append(f"{flag} {' '.join(map(str, value))}")
            else:
                flags.append(f"{flag} {value}")
    return " ".join(["polyak study", *flags])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run the study described by ``config``; write its outputs; return every number."""
    requested = config
    cfg = config.resolved()
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kw: dict[str, Any] = {"seed": 0}
    if cfg.dataset.lower().replace("_", "-") in ("auto", "fashion-mnist"):
        kw.update(train_size=cfg.train_size, test_size=cfg.test_size)
    data, message = resolve_dataset(cfg.dataset, cfg.data_dir, **kw)
    print(message, file=sys.stderr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tty = cfg.progress and sys.stderr.isatty()
    reg_units = 2 * cfg.regression_splits if cfg.regression else 0
    progress = Progress(len(cfg.noise) * cfg.seeds * cfg.epochs + reg_units, "study",
                        enabled=tty)  # fmt: skip

    runs: dict[str, list[dict[str, Any]]] = {}
    reliability: dict[str, Any] = {}
    for noise in cfg.noise:
        split = make_split(data, noise, cfg.val_fraction)
        runs[str(noise)] = []
        for seed in range(cfg.seeds):
            t0 = time.perf_counter()
            run = train_run(cfg, split, seed, tick=progress.update)
            runs[str(noise)].append(run)
            if cfg.progress and not tty:
                acc = {m: f"{s['acc']:.3f}" for m, s in run["final"].items() if "+bn" not in m}
                print(f"noise {noise:.0%} seed {seed}: {time.perf_counter() - t0:.1f}s, final "
                      f"test accuracy {acc}", file=sys.stderr, flush=True)  # fmt: skip
            if noise == 0.0 and seed == 0:
                reliability = {"labels": split.y_test.numpy(), "probabilities": {}}
    summary = {n: summarise_noise_level(r) for n, r in runs.items()}
    if reliability:
        clean = runs["0.0"][0]["probabilities"]
        best = summary["0.0"]["verdict"]["best_average"]
        reliability["probabilities"] = {LIVE: clean[LIVE], best: clean[best]}

    regression = None
    if cfg.regression:
        regression = run_regression(cfg.regression_splits, cfg.quick, tick=progress.update)
    progress.close()

    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "command": _command(requested),
        "dataset": {"name": data.name, "source": data.source, "message": message,
                    "train": len(data.x_train), "test": len(data.x_test)},
        "versions": {"polyak": polyak.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"},
        "classification": {
            "summary": summary,
            "runs": {n: [{k: v for k, v in r.items() if k not in ("predictions", "probabilities")}
                         for r in rs] for n, rs in runs.items()},
        },
        "regression": regression,
    }  # fmt: skip
    results["wall_time_s"] = time.perf_counter() - start
    plots = write_plots(results, reliability, out)
    write_report(results, plots, out)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    print(format_table(summary))
    for line in findings(results):
        print(line.replace("**", "").replace("`", ""))
    print(f"\nwall time {results['wall_time_s']:.0f} s; report: {out / 'report.md'}")
    return results
