"""``polyak study``: measure on real data what averaging the weights buys (or does not).

Trains a small network several times per label-noise level, keeping three averages of the
weights, and compares them with the live weights: final and best-epoch accuracy, NLL, ECE,
memorisation of noisy labels and agreement between seeds; plus a regression task. With
``--task rul``, remaining useful life on the user's C-MAPSS files instead
(:mod:`polyak.cli.study.rul`). Writes ``results.json``, PNG plots and ``report.md`` to ``--out`` and
prints a table.
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
from polyak.cli.common import check_output_dir, machine
from polyak.cli.study.classify import LIVE, make_split, train_run
from polyak.cli.study.cmapss import load_cmapss
from polyak.cli.study.config import StudyConfig
from polyak.cli.study.data import Dataset, resolve_dataset
from polyak.cli.study.merge_decay import merge_run, summarise_merge
from polyak.cli.study.methods import WRITE_BACKS, train_write_back
from polyak.cli.study.methods_report import summarise_methods
from polyak.cli.study.plots import write_plots
from polyak.cli.study.posthoc_sweep import summarise_posthoc
from polyak.cli.study.regression import SETTINGS, regression_case, summarise_regression
from polyak.cli.study.report import findings, format_table, targets, write_report
from polyak.cli.study.rul import summarise_rul, train_rul_seed
from polyak.cli.study.rul_prep import RulData, prepare_rul
from polyak.cli.study.rul_report import rul_findings, rul_table, write_rul_outputs
from polyak.cli.study.summary import summarise_noise_level
from polyak.workflows.progress import Progress

__all__ = ["StudyPlan", "prepare_study", "run_study"]


@dataclass(frozen=True)
class StudyPlan:
    """A validated study, its data loaded and its output directory made: what
    :func:`prepare_study` checked, so that :func:`run_study` fails for no user error."""

    requested: StudyConfig  # as given (for the "reproduce with" command)
    config: StudyConfig  # resolved
    data: Dataset | RulData
    message: str  # which data was used, for the user
    out: Path
    started: float  # time.perf_counter() when preparing began: the wall time counts it


def prepare_study(config: StudyConfig) -> StudyPlan:
    """Validate ``config``, load its dataset and create its output directory.

    Raises:
        ValueError: a bad setting, a dataset that is missing or malformed
            (:class:`polyak.cli.study.data.DataError`), or an output directory that cannot be
            written; the message names the flag or the file.
    """
    started = time.perf_counter()
    cfg = config.resolved()
    if cfg.task == "rul":
        assert cfg.data_dir is not None  # resolved() demands it
        rul = prepare_rul(load_cmapss(cfg.data_dir, cfg.subset), val_fraction=cfg.val_fraction)
        check_output_dir(cfg.out, "--out")
        message = (
            f"Using {rul.name} from {cfg.data_dir}: {len(rul.train_units)} training "
            f"and {len(rul.val_units)} validation units, {len(rul.y_test)} test units; "
            f"{len(rul.sensors)} of 21 sensors kept."
        )
        return StudyPlan(config, cfg, rul, message, Path(cfg.out), started)
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
        if f.name != "given" and (f.name in cfg.given or value != getattr(defaults, f.name)):
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
    elif job[0] == "wb":
        _, noise, seed, variant = job
        result = train_write_back(cfg, _SHARED["splits"][noise], seed, variant)
    elif job[0] == "merge":
        result = merge_run(cfg, _SHARED["splits"][min(cfg.noise)], job[1])
    elif job[0] == "rul":
        result = train_rul_seed(
            _SHARED["rul"], job[1], epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            patience=cfg.patience,
        )  # fmt: skip
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
        futures = [pool.submit(_job, j) for j in sorted(jobs, key=lambda j: j[0] == "reg")]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:  # a failed job ends the study now, not after the queued ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_study(config: StudyConfig | StudyPlan) -> dict[str, Any]:
    """Run the study described by ``config`` (or a :func:`prepare_study` plan); write its
    outputs to ``config.out``; return every number."""
    plan = config if isinstance(config, StudyPlan) else prepare_study(config)
    cfg, data, message, out = plan.config, plan.data, plan.message, plan.out
    torch.set_num_threads(cfg.threads)
    print(message, file=sys.stderr)
    if isinstance(data, RulData):
        return _run_rul(plan, data)
    tty = cfg.progress and sys.stderr.isatty()
    reg_units = len(SETTINGS) * cfg.regression_splits if cfg.regression else 0
    merge_units = cfg.seeds * cfg.epochs if cfg.merge else 0
    progress = Progress(len(cfg.noise) * cfg.seeds * cfg.epochs + reg_units + merge_units,
                        "study", enabled=tty)  # fmt: skip
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    reg_splits = range(cfg.first_seed, cfg.first_seed + cfg.regression_splits)

    splits = {noise: make_split(data, noise, cfg.val_fraction) for noise in cfg.noise}
    jobs: list[tuple[Any, ...]] = [("cls", n, seed) for n in cfg.noise for seed in seeds]
    if cfg.regression:
        jobs += [("reg", name, i) for name in SETTINGS for i in reg_splits]
    if cfg.methods:
        jobs += [("wb", n, seed, v) for n in cfg.noise for seed in seeds for v in WRITE_BACKS]
    if cfg.merge:
        jobs += [("merge", seed) for seed in seeds]
    _SHARED.update(cfg=cfg, splits=splits)
    done: dict[tuple[Any, ...], Any] = {}
    for job, result, seconds in _execute(jobs, cfg.workers):
        done[job] = result
        # write-back runs ("wb") are not in the progress total
        progress.update({"reg": 1, "wb": 0}.get(job[0], cfg.epochs))
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
        **_header(plan),
        "default_protocol": cfg.is_default_protocol() and data.name == "fashion-mnist",
        "dataset": {"name": data.name, "source": data.source, "message": message,
                    "train": len(data.x_train), "test": len(data.x_test)},
        "classification": {
            "summary": summary,
            "runs": {n: [{k: v for k, v in r.items() if k not in ("predictions", "probabilities")}
                         for r in rs] for n, rs in runs.items()},
        },
        "regression": regression,
        "posthoc": {n: summarise_posthoc(r, summary[n]["models"][LIVE]) for n, r in runs.items()}
        if cfg.posthoc else None,
        "methods": {n: summarise_methods(r, [v for k, v in done.items() if k[0] == "wb"
                                             and str(k[1]) == n], summary[n])
                    for n, r in runs.items()} if cfg.methods else None,
        "merge": {"noise": min(cfg.noise), **summarise_merge([done[("merge", s)] for s in seeds]),
                  "runs": [done[("merge", s)] for s in seeds]} if cfg.merge else None,
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


def _header(plan: StudyPlan) -> dict[str, Any]:
    """What every ``results.json`` starts with: the settings, the command, versions, machine."""
    return {
        "config": dataclasses.asdict(plan.config),
        "command": _command(plan.requested),
        "versions": {"polyak": polyak.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "machine": machine(),
    }  # fmt: skip


def _run_rul(plan: StudyPlan, data: RulData) -> dict[str, Any]:
    """``--task rul``: one job per seed, then the summary, the files and the printed lines."""
    cfg, out = plan.config, plan.out
    tty = cfg.progress and sys.stderr.isatty()
    progress = Progress(cfg.seeds, "study rul", enabled=tty)
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    _SHARED.update(cfg=cfg, rul=data)
    done: dict[int, dict[str, Any]] = {}
    for job, result, seconds in _execute([("rul", seed) for seed in seeds], cfg.workers):
        done[job[1]] = result
        progress.update(1)
        if cfg.progress and not tty:
            rmse = {c: f"{v['test_rmse']:.2f}" for c, v in result["chosen"].items()}
            print(f"seed {job[1]}: {seconds:.1f}s, {result['epochs_run']} epochs, test RMSE "
                  f"{rmse}", file=sys.stderr, flush=True)  # fmt: skip
    progress.close()
    runs = [done[seed] for seed in seeds]
    results: dict[str, Any] = {
        **_header(plan),
        "default_protocol": False,
        "dataset": {"name": data.name, "source": data.source,
                    "message": plan.message, "sensors": list(data.sensors),
                    "dropped": list(data.dropped), "conditions": data.conditions,
                    "window": data.window, "cap": data.cap,
                    "train_units": len(data.train_units), "val_units": len(data.val_units),
                    "test_units": len(data.y_test), "train_windows": len(data.y_train),
                    "val_windows": len(data.y_val), "padded_test_units": data.padded_test_units,
                    "test_rul": data.y_test.tolist()},
        "rul": {"summary": summarise_rul(runs, data), "runs": runs},
    }  # fmt: skip
    results["wall_time_s"] = time.perf_counter() - plan.started
    write_rul_outputs(results, out)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    print(rul_table(results["rul"]["summary"]))
    for line in rul_findings(results):
        print(line.replace("**", "").replace("`", ""))
    print(f"\nwall time {results['wall_time_s']:.0f} s; report: {out / 'report.md'}")
    return results
