"""Every ``examples/*.py`` runs with ``--fast`` in its own process and exits 0.

The list is read from the directory, so new examples are run too. One is skipped only where a
slow-tier test runs it (``ELSEWHERE``) or where it cannot run: a package it imports is not
installed (the oldest-versions CI job installs only what polyak requires), or FSDP2 on the CPU
before torch 2.7 (torch 2.6's CPU streams have no ``record_event``, which FSDP2's all-gather
calls).

Nearly all of an example's ``--fast`` run is importing torch (and torch._dynamo, which the first
optimizer pulls in) and scikit-learn: ~6 s of CPU each, against well under a second of work. So on
Linux one launcher process imports them once and forks a child per example, which runs the file as
``__main__`` with ``sys.argv == [path, "--fast"]`` (the way ``python path --fast`` would) and its
own stdout, stderr and exit code. Elsewhere each example is started as ``python path --fast``.
Both run all examples side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _unrunnable(path: Path) -> str | None:
    import torch

    from conftest import _missing

    missing = _missing(path)
    if missing:
        return f"{', '.join(missing)} not installed"
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if "fully_shard" in path.read_text() and version < (2, 7):
        return f"FSDP2 on the CPU needs torch >= 2.7 (this is {torch.__version__})"
    return None


# examples whose --fast run is a slow-tier test elsewhere (several framework processes)
ELSEWHERE = {"deepspeed_zero3": "two DeepSpeed processes (10-40 s): tests/test_deepspeed.py"}
RUNNABLE = [p for p in EXAMPLES if _unrunnable(p) is None and p.stem not in ELSEWHERE]
TIMEOUT = 300  # seconds for all of them, generous for a loaded machine
REQUIRED = ("train_with_ema", "early_stopping", "target_network", "ensembling", "recompute_bn")

_LAUNCHER = r"""
import os, runpy, sys, traceback

import importlib
for name in ("numpy", "torch", "torch._dynamo", "torch.utils.data", "sklearn.datasets",
             "sklearn.model_selection", "polyak", "polyak.cli.study.data", "polyak.workflows",
             "lightning.pytorch", "transformers.trainer", "accelerate", "peft", "trl"):
    try:  # what the examples import (no torch op runs before the fork)
        importlib.import_module(name)
    except ImportError:  # the example that needs it will say so
        pass

logs, paths = sys.argv[1], sys.argv[2:]
children = {}
for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    pid = os.fork()
    if pid:
        children[pid] = stem
        continue
    code = 1
    try:
        out = os.open(os.path.join(logs, stem + ".out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(os.path.join(logs, stem + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.argv = [path, "--fast"]
        sys.path.insert(0, os.path.dirname(path))
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
while children:
    pid, status = os.wait()
    with open(os.path.join(logs, children.pop(pid) + ".code"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


def test_the_workflow_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert set(REQUIRED) <= names, f"missing examples: {set(REQUIRED) - names}"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Run every example to the end; ``{stem: (exit code, stdout, stderr)}``."""
    logs = tmp_path_factory.mktemp("examples")
    # One thread each: the examples run side by side, and their models are tiny.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _LAUNCHER, str(logs), *map(str, RUNNABLE)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env), None))
    else:  # pragma: no cover - no fork: one interpreter per example
        for p in RUNNABLE:
            out = open(logs / f"{p.stem}.out", "w")  # noqa: SIM115 - the child owns it
            err = open(logs / f"{p.stem}.err", "w")  # noqa: SIM115
            cmd = [sys.executable, str(p), "--fast"]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err), p.stem))
    try:
        for proc, stem in procs:
            code = proc.wait(timeout=TIMEOUT)
            if stem is not None:
                (logs / f"{stem}.code").write_text(str(code))
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            proc.kill()
        pytest.fail(f"the examples did not finish within {TIMEOUT} s")
    results = {}
    for p in RUNNABLE:
        code = _read(logs / f"{p.stem}.code")
        out, err = _read(logs / f"{p.stem}.out"), _read(logs / f"{p.stem}.err")
        results[p.stem] = (int(code) if code else None, out, err)
    return results


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_fast(path, finished):
    reason = _unrunnable(path) or ELSEWHERE.get(path.stem)
    if reason:
        pytest.skip(reason)
    code, stdout, stderr = finished[path.stem]
    assert code is not None, f"{path.name}: no exit code (the launcher failed, see its stderr)"
    assert code == 0, f"{path.name} --fast exited with {code}:\n{stderr[-4000:]}"
    assert stdout.strip(), f"{path.name} --fast printed nothing"
