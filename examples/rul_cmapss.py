"""Remaining useful life on NASA C-MAPSS: live weights vs averages of them, on your files or on
synthetic ones.

Runs ``polyak study --task rul``: a small 1-D CNN trained with ``polyak.train_with_ema``, keeping
an EMA of decay 0.999 (the course recipe: "EMA typically reduces RMSE by 2-5%"), a warm-up EMA and
a power average; each is early-stopped on the validation units' RMSE and scored on the test units
(RMSE and the PHM08 score), over several seeds. Without ``--data-dir`` it first writes synthetic
engines in exactly the C-MAPSS file format (100 training and 100 test units of 128 to 362
cycles, like FD001; sensors drifting exponentially towards failure); nothing is downloaded.

    python examples/rul_cmapss.py                   # synthetic FD001-sized data, 5 seeds
    python examples/rul_cmapss.py --data-dir DIR    # NASA's train_FD001.txt, test_... in DIR
    python examples/rul_cmapss.py --fast            # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from polyak.cli.study.cmapss import SUBSETS, write_synthetic_cmapss
from polyak.cli.study.config import StudyConfig
from polyak.cli.study.run import run_study


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a tiny run, for the tests")
    parser.add_argument("--data-dir", help="directory of NASA's C-MAPSS text files")
    parser.add_argument("--subset", default="FD001", choices=SUBSETS)
    parser.add_argument("--out", help="output directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    fast = {"epochs": 4, "patience": 2, "seeds": 2, "batch_size": 32, "workers": 1}
    with tempfile.TemporaryDirectory(prefix="polyak-rul-") as tmp:  # removed at the end
        out = args.out or (tmp if args.fast else tempfile.mkdtemp(prefix="polyak-rul-"))
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = str(Path(tmp) / "synthetic-cmapss")
            size = dict(train_units=12, test_units=20, cycles=(50, 110)) if args.fast else {}
            kw: dict[str, Any] = {"train_units": 100, "test_units": 100, "cycles": (128, 362)}
            write_synthetic_cmapss(data_dir, args.subset, seed=0, **{**kw, **size})
            print(f"synthetic C-MAPSS files ({args.subset} format) in {data_dir} (temporary)")
        config = StudyConfig(task="rul", data_dir=data_dir, subset=args.subset, out=out,
                             progress=not args.fast, **(fast if args.fast else {}))  # fmt: skip
        results = run_study(config)
    summary = results["rul"]["summary"]
    live = summary["candidates"]["live"]["test_rmse"]["mean"]
    best = summary["candidates"][summary["chosen_average"]]["test_rmse"]["mean"]
    print(f"test RMSE: live {live:.2f}, {summary['chosen_average']} {best:.2f} cycles; "
          f"predicting the mean: {summary['baseline_rmse']:.2f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
