"""``polyak merge`` and ``polyak posthoc --score``: every mistake one line on stderr and exit
status 2 before any tensor is read, ``--dry-run`` prints the weights and plots them, a merge on the
command line is the library's, the greedy soup and the post-hoc score use the user's scorer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyak
from polyak.cli import main


@pytest.fixture
def run_dir(tmp_path):
    """Five Hugging Face checkpoint folders of a run (steps 100..500), listed out of order."""
    torch.manual_seed(0)
    paths = []
    for step in (100, 200, 300, 400, 500):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.randn(4, 3), "n": torch.tensor(step)}, folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        paths.append(str(folder))
    return tmp_path, sorted(paths)  # a glob's order: checkpoint-100, -200, ... by chance here


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (one line too, see cli._Parser)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


MISTAKES = {
    "no method": ([], "one of the arguments --weights --lawa --ema --sigma-rel --wsm "
                      "--greedy-soup is required"),
    "two methods": (["--lawa", "2", "--ema", "0.9"], "not allowed with argument"),
    "bad decay": (["--ema", "1.5"], "decay must be in (0, 1), got 1.5"),
    "bad sigma": (["--sigma-rel", "0.5"], "sigma_rel must be in"),
    "lawa too long": (["--lawa", "9"], "k=9 is more than the 5 checkpoints given"),
    "bad wsm": (["--wsm", "linear"], "--wsm linear: give SHAPE:WINDOW"),
    "long window": (["--wsm", "cosine:1000"], "window=1000 is longer than the run"),
    "weights count": (["--weights", "1", "2"], "2 weights for 5 checkpoints"),
    "negative weight": (["--weights", "1", "1", "-1", "1", "1"], "weight 2 is -1.0: merge"),
    "nan weight": (["--weights", "1", "1", "nan", "1", "1"], "weight 2 is nan"),
    "dry soup": (["--greedy-soup", "m:f", "--dry-run"], "--dry-run prints weights fixed"),
    "bad scorer": (["--greedy-soup", "nomodule_q:f"], "cannot import nomodule_q"),
    "bad size": (["--lawa", "2", "--max-shard-size", "big"], "--max-shard-size big: give a size"),
    "start alone": (["--lawa", "2", "--start", "5"], "--start goes with --ema or --sigma-rel"),
    "steps count": (["--lawa", "2", "--steps", "1", "2"], "2 steps given for 5 checkpoints"),
    "bad dtype": (["--lawa", "2", "--dtype", "int8"], "argument --dtype: invalid choice"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_mistakes_are_one_line_and_exit_2(case, run_dir, capsys):
    tmp_path, paths = run_dir
    extra, message = MISTAKES[case]
    code, out, err = _cli(["merge", *paths, *extra, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("polyak merge: error: ") and out == ""
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else 1


def test_checkpoint_mistakes_are_one_line(tmp_path, capsys):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"v": torch.ones(2)}, tmp_path / "b.safetensors")
    for argv, message in [
        ([tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--lawa", "2"],
         "has no tensor 'v', which"),
        ([tmp_path / "a.safetensors", tmp_path / "a.safetensors", "--ema", "0.9"],
         "a.safetensors carries no step (2 of 2 checkpoints do not): give --steps"),
        ([tmp_path / "nothing", "--lawa", "1"], "nothing does not exist"),
        ([tmp_path / "a.safetensors", "--lawa", "1", "--out", tmp_path], "holds the input"),
    ]:  # fmt: skip
        out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
        code, _, err = _cli(["merge", *map(str, argv), *out], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_dry_run_prints_the_weights_and_plots_them(run_dir, capsys):
    tmp_path, paths = run_dir
    out = tmp_path / "out"
    code, printed, err = _cli(["merge", *paths[::-1], "--ema", "0.99", "--dry-run", "--out",
                               str(out)], capsys)  # fmt: skip
    assert code == 0 and err == ""
    w = polyak.merge.weights.ema([100, 200, 300, 400, 500], 0.99)
    assert f"weights ema(decay=0.99), fit {w.fit:.2g}" in printed
    lines = printed.splitlines()
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if "step" in x))
                                                + 1 : -1]]  # fmt: skip
    assert [int(r[0]) for r in rows] == [100, 200, 300, 400, 500]  # sorted by step
    assert [float(r[1]) for r in rows] == pytest.approx([round(x, 4) for x in w], abs=1e-4)
    png = (out / "merge_weights.png").read_bytes()
    assert png.startswith(b"\x89PNG") and sorted(p.name for p in out.iterdir()) == [
        "merge_weights.png"
    ]


@pytest.mark.parametrize("method", [["--wsm", "linear:200"], ["--sigma-rel", "0.2"],
                                    ["--weights", "5", "4", "3", "2", "1"]])  # fmt: skip
def test_a_merge_on_the_command_line_is_the_librarys(method, run_dir, capsys):
    tmp_path, paths = run_dir
    code, printed, _ = _cli(["merge", *paths, *method, "--out", str(tmp_path / "cli")], capsys)
    assert code == 0 and "merged 1 tensors, copied 1 (integer)" in printed
    steps = [100, 200, 300, 400, 500]
    w = {
        "--wsm": lambda: polyak.merge.weights.wsm(steps, "linear", window=200),
        "--sigma-rel": lambda: polyak.merge.weights.power(steps, 0.2),
        "--weights": lambda: [5, 4, 3, 2, 1],
    }[method[0]]()
    polyak.merge.merge(paths, w, tmp_path / "lib")
    a = load_file(tmp_path / "cli" / "model.safetensors")
    b = load_file(tmp_path / "lib" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b) and a["n"].item() == 500


SCORER = """
import torch

def closeness(state_dict):
    # higher is better: a mean close to TARGET
    return -abs(float(state_dict["{tensor}"].mean()) - TARGET)

TARGET = {target}

def broken(state_dict):
    return float("nan")
"""


def test_the_greedy_soup_on_the_command_line(run_dir, capsys):
    tmp_path, paths = run_dir
    (tmp_path / "scoring.py").write_text(SCORER.format(tensor="w", target=0.0))
    code, printed, err = _cli(["merge", *paths, "--greedy-soup",
                               f"{tmp_path / 'scoring.py'}:closeness", "--out",
                               str(tmp_path / "soup")], capsys)  # fmt: skip
    assert code == 0 and err == ""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scoring_ref", tmp_path / "scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    soup = polyak.merge.greedy_soup(paths, module.closeness, tmp_path / "lib")
    assert f"soup of {len(soup.kept)}: score {soup.soup_score:.6g}" in printed
    a = load_file(tmp_path / "soup" / "model.safetensors")
    b = load_file(tmp_path / "lib" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    (tmp_path / "scoring.py").write_text(SCORER.format(tensor="w", target=0.0))
    code, _, err = _cli(["merge", *paths, "--greedy-soup", f"{tmp_path / 'scoring.py'}:broken",
                         "--out", str(tmp_path / "broken")], capsys)  # fmt: skip
    assert code == 2 and "the scorer broken returned nan for" in err and err.count("\n") == 1
    assert not (tmp_path / "broken" / "model.safetensors").exists()


def test_a_failed_write_is_one_line(run_dir, capsys, monkeypatch):
    tmp_path, paths = run_dir
    from polyak import files

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.Outputs, "commit", full)
    code, _, err = _cli(["merge", *paths, "--lawa", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot write the merge to" in err and "No space left" in err
    assert err.count("\n") == 1 and not list((tmp_path / "o").iterdir())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from posthoc_helpers import walked_store

    return walked_store(tmp_path_factory.mktemp("store"))


def test_posthoc_score_reports_the_best_target(store, tmp_path, capsys):
    recs = polyak.posthoc.reconstruct_many(store, [0.05, 0.08, 0.12])
    means = {label: float(r["0.weight"].mean()) for label, r in recs.items()}
    target = means["sigma_rel=0.08"] + 1e-6  # the middle one is the best
    (tmp_path / "scoring.py").write_text(SCORER.format(tensor="0.weight", target=target))
    out = tmp_path / "out"
    code, printed, _ = _cli(["posthoc", str(store), "--sigma-rel", "0.05", "0.08", "0.12",
                             "--no-plot", "--score", f"{tmp_path / 'scoring.py'}:closeness",
                             "--out", str(out)], capsys)  # fmt: skip
    assert code == 0
    assert f"best by {tmp_path / 'scoring.py'}:closeness: sigma_rel=0.08" in printed
    from safetensors import safe_open

    with safe_open(out / "sigma_rel=0.08.safetensors", "pt") as f:
        assert float(f.metadata()["score"]) == pytest.approx(-1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nomodule_xyz:f", "--score nomodule_xyz:f: cannot import nomodule_xyz"),
        ("{dir}/scoring.py:missing", "scoring.py has no attribute 'missing'"),
        ("{dir}/scoring.py", "give MODULE:FUNCTION"),
        ("{dir}/scoring.py:broken", "the scorer broken returned nan for sigma_rel=0.05; it must"),
    ],
)
def test_posthoc_score_mistakes_are_one_line(store, tmp_path, capsys, spec, message):
    (tmp_path / "scoring.py").write_text(SCORER.format(tensor="0.weight", target=0.0))
    out = tmp_path / "out"
    argv = ["posthoc", str(store), "--sigma-rel", "0.05", "--no-plot", "--score",
            spec.format(dir=tmp_path), "--out", str(out)]  # fmt: skip
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("polyak posthoc: error: ") and message in err
    assert not list(out.glob("*.safetensors"))  # nothing written
