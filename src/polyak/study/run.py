"""``polyak study``: measure on real data what averaging the weights buys (or does not).

Trains a small network several times per label-noise level, keeping three averages of the
weights, and compares them with the live weights: final and best-epoch accuracy, NLL, ECE,
memorisation of noisy labels and agreement between seeds; plus a regression task. Writes
``results.json``, PNG plots and ``report.md`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polyak
from polyak.study.classify import LIVE, make_split, train_run
from polyak.study.config import StudyConfig
from polyak.study.data import resolve_dataset
from polyak.study.regression import SETTINGS, regression_case, summarise_regression
from polyak.study.report import findings, format_table, targets, write_plots, write_report
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


_SHARED: dict[str, Any] = {}  # the config and data, inherited by forked workers


def _job(job: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, float]:
    cfg = _SHARED["cfg"]
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    if job[0] == "cls":
        _, noise, seed = job
        result: Any = train_run(cfg, _SHARED["splits"][noise], seed)
    else:
        _, name, split = job
        result = regression_case(name, split, cfg.quick)
    return job, result, time.perf_counter() - start


def _execute(jobs: list[tuple[Any, ...]], workers: int) -> Iterator[tuple[Any, ...]]:
    """Run jobs in ``workers`` forked processes (or here, with one worker / without fork).

    Each job seeds itself and runs on ``threads`` threads, so the numbers do not depend on which
    process ran it. Tiny models run faster on one thread per process than on several.
    """
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        yield from map(_job, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        # the longest jobs first, so that the two workers finish together
        futures = [pool.submit(_job, j) for j in sorted(jobs, key=lambda j: j[0] != "cls")]
        for future in as_completed(futures):
            yield future.result()


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run the study described by ``config``; write its outputs; return every number."""
    requested = config
    cfg = config.resolved()
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    kw: dict[str, Any] = {"seed": 0}
    if cfg.dataset.lower().replace("_", "-") in ("auto", "fashion-mnist"):
        kw.update(train_size=cfg.train_size, test_size=cfg.test_size)
    data, message = resolve_dataset(cfg.dataset, cfg.data_dir, **kw)
    print(message, file=sys.stderr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tty = cfg.progress and sys.stderr.isatty()
    reg_units = len(SETTINGS) * cfg.regression_splits if cfg.regression else 0
    progress = Progress(len(cfg.noise) * cfg.seeds * cfg.epochs + reg_units, "study",
                        enabled=tty)  # fmt: skip

    splits = {noise: make_split(data, noise, cfg.val_fraction) for noise in cfg.noise}
    jobs: list[tuple[Any, ...]] = [("cls", n, seed) for n in cfg.noise for seed in range(cfg.seeds)]
    if cfg.regression:
        jobs += [("reg", name, i) for name in SETTINGS for i in range(cfg.regression_splits)]
    _SHARED.update(cfg=cfg, splits=splits)
    done: dict[tuple[Any, ...], Any] = {}
    for job, result, seconds in _execute(jobs, cfg.workers):
        done[job] = result
        progress.update(cfg.epochs if job[0] == "cls" else 1)
        if cfg.progress and not tty and job[0] == "cls":
            acc = {m: f"{s['acc']:.3f}" for m, s in result["final"].items() if "+bn" not in m}
            print(f"noise {job[1]:.0%} seed {job[2]}: {seconds:.1f}s, final test accuracy {acc}",
                  file=sys.stderr, flush=True)  # fmt: skip
    progress.close()
    runs = {str(n): [done[("cls", n, seed)] for seed in range(cfg.seeds)] for n in cfg.noise}
    summary = {n: summarise_noise_level(r) for n, r in runs.items()}
    reliability: dict[str, Any] = {}
    if "0.0" in runs:
        clean = runs["0.0"][0]["probabilities"]
        best = summary["0.0"]["verdict"]["best_average"]
        reliability = {
            "labels": splits[0.0].y_test.numpy(),
            "probabilities": {LIVE: clean[LIVE], best: clean[best]},
        }
    regression = None
    if cfg.regression:
        rows = {
            name: [done[("reg", name, i)] for i in range(cfg.regression_splits)]
            for name in SETTINGS
        }
        regression = summarise_regression(rows, cfg.quick)

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
    met = [ok for *_, ok in targets(results)]
    print(f"\nwall time {results['wall_time_s']:.0f} s; goals of the default protocol met: "
          f"{sum(met)} of {len(met)}; report: {out / 'report.md'}")  # fmt: skip
    return results
