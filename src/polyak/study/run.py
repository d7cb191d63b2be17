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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polyak
from polyak.bench.report import check_output_dir, machine
from polyak.study.classify import LIVE, make_split, train_run
from polyak.study.config import StudyConfig
from polyak.study.data import Dataset, resolve_dataset
from polyak.study.plots import write_plots
from polyak.study.regression import SETTINGS, regression_case, summarise_regression
from polyak.study.report import findings, format_table, targets, write_report
from polyak.study.summary import summarise_noise_level
from polyak.workflows.progress import Progress

__all__ = ["StudyPlan", "prepare_study", "run_study"]


@dataclass(frozen=True)
class StudyPlan:
    """A validated study, its data loaded and its output directory made: what
    :func:`prepare_study` checked, so that :func:`run_study` fails for no user error."""

    requested: StudyConfig  # as given (for the "reproduce with" command)
    config: StudyConfig  # resolved
    data: Dataset
    message: str  # which data was used, for the user
    out: Path
    started: float  # time.perf_counter() when preparing began: the wall time counts it


def prepare_study(config: StudyConfig) -> StudyPlan:
    """Validate ``config``, load its dataset and create its output directory.

    Raises:
        ValueError: a bad setting, a dataset that is missing or malformed
            (:class:`polyak.study.data.DataError`), or an output directory that cannot be
            written; the message names the flag or the file.
    """
    started = time.perf_counter()
    cfg = config.resolved()
    kw: dict[str, Any] = {"seed": 0}
    if cfg.dataset in ("auto", "fashion-mnist"):
        kw.update(train_size=cfg.train_size, test_size=cfg.test_size)
    data, message = resolve_dataset(cfg.dataset, cfg.data_dir, **kw)
    check_output_dir(cfg.out, "--out")
    return StudyPlan(config, cfg, data, message, Path(cfg.out), started)


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


def run_study(config: StudyConfig | StudyPlan) -> dict[str, Any]:
    """Run the study described by ``config`` (or a :func:`prepare_study` plan); write its
    outputs to ``config.out``; return every number."""
    plan = config if isinstance(config, StudyPlan) else prepare_study(config)
    cfg, data, message, out = plan.config, plan.data, plan.message, plan.out
    torch.set_num_threads(cfg.threads)
    print(message, file=sys.stderr)
    tty = cfg.progress and sys.stderr.isatty()
    reg_units = len(SETTINGS) * cfg.regression_splits if cfg.regression else 0
    progress = Progress(len(cfg.noise) * cfg.seeds * cfg.epochs + reg_units, "study",
                        enabled=tty)  # fmt: skip
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    reg_splits = range(cfg.first_seed, cfg.first_seed + cfg.regression_splits)

    splits = {noise: make_split(data, noise, cfg.val_fraction) for noise in cfg.noise}
    jobs: list[tuple[Any, ...]] = [("cls", n, seed) for n in cfg.noise for seed in seeds]
    if cfg.regression:
        jobs += [("reg", name, i) for name in SETTINGS for i in reg_splits]
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
    runs = {str(n): [done[("cls", n, seed)] for seed in seeds] for n in cfg.noise}
    summary = {n: summarise_noise_level(r) for n, r in runs.items()}
    reliability: dict[str, Any] = {}
    if "0.0" in runs:
        clean = runs["0.0"][0]["probabilities"]
        best = summary["0.0"]["verdict"]["best_average"]
        reliability = {
            "labels": splits[0.0].y_test.numpy(),
            "probabilities": {LIVE: clean[LIVE], best: clean[best]},
            "seed": cfg.first_seed,
        }
    regression = None
    if cfg.regression:
        rows = {name: [done[("reg", name, i)] for i in reg_splits] for name in SETTINGS}
        regression = summarise_regression(rows, cfg.quick)

    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "command": _command(plan.requested),
        "default_protocol": cfg.is_default_protocol() and data.name == "fashion-mnist",
        "dataset": {"name": data.name, "source": data.source, "message": message,
                    "train": len(data.x_train), "test": len(data.x_test)},
        "versions": {"polyak": polyak.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "machine": machine(),
        "classification": {
            "summary": summary,
            "runs": {n: [{k: v for k, v in r.items() if k not in ("predictions", "probabilities")}
                         for r in rs] for n, rs in runs.items()},
        },
        "regression": regression,
    }  # fmt: skip
    results["wall_time_s"] = time.perf_counter() - plan.started
    plots = write_plots(results, reliability, out)
    write_report(results, plots, out)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    print(format_table(summary))
    for line in findings(results):
        print(line.replace("**", "").replace("`", ""))
    graded = ""
    if results["default_protocol"]:
        met = [ok for *_, ok in targets(results)]
        graded = f"; goals of the default protocol met: {sum(met)} of {len(met)}"
    print(f"\nwall time {results['wall_time_s']:.0f} s{graded}; report: {out / 'report.md'}")
    return results
