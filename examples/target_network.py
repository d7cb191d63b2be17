"""A momentum teacher (mean teacher) with a cosine decay ramp, semi-supervised on digits.

Only 100 of the training images keep their labels. A student network learns from them and, on the
unlabeled rest, to agree with a teacher whose weights are an exponential moving average of the
student's (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017). After
every optimizer step the teacher moves towards the student with ``polyak.soft_update_``:

    teacher <- decay_t * teacher + (1 - decay_t) * student

and ``decay_t`` follows the BYOL cosine ramp ``polyak.schedules.cosine`` from 0.95 up to 0.995
(Grill et al., NeurIPS 2020). The same update in RL notation is ``soft_update_(target, online,
tau=1 - decay_t)``: ``tau`` is the weight on the online network, never the decay.

    python examples/target_network.py            # ~10 s on 2 CPU cores
    python examples/target_network.py --fast     # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

import polyak
from polyak.cli.study.data import load_digits
from polyak.workflows import soft_update_


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return polyak.metrics.accuracy(logits, y), polyak.metrics.nll_from_logits(logits, y)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few epochs, for the tests")
    parser.add_argument("--labels", type=int, default=100, help="labeled training images")
    args = parser.parse_args(argv)
    epochs = 3 if args.fast else 40

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    data = load_digits(seed=0)
    rng = np.random.default_rng(0)
    labeled = np.concatenate(  # the same number of labels per class
        [
            rng.choice(np.flatnonzero(data.y_train == c), args.labels // 10, replace=False)
            for c in range(10)
        ]
    )
    unlabeled = np.setdiff1d(np.arange(len(data.y_train)), labeled)
    xl, yl = torch.from_numpy(data.x_train[labeled]), torch.from_numpy(data.y_train[labeled])
    xu = torch.from_numpy(data.x_train[unlabeled])
    xv, yv = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    student = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)  # trained only through soft_update_
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    steps_per_epoch = len(xu) // 32
    total = epochs * steps_per_epoch
    ramp = polyak.schedules.cosine(0.95, 0.995, total_steps=total)  # decay 0.95 -> 0.995

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + 0.15 * torch.randn_like(x)

    step = 0
    print(f"digits: {len(xl)} labeled, {len(xu)} unlabeled, {len(xv)} validation images")
    print("epoch  decay   student acc/loss  teacher acc/loss")
    results: dict[str, tuple[float, float]] = {}
    seen: dict[str, list[float]] = {"student": [], "teacher": []}
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(xu))[: steps_per_epoch * 32].split(32):
            step += 1
            lab = torch.randint(len(xl), (32,))
            supervised = nn.functional.cross_entropy(student(noisy(xl[lab])), yl[lab])
            with torch.no_grad():
                target = teacher(noisy(xu[idx])).softmax(1)
            log_p = student(noisy(xu[idx])).log_softmax(1)
            agree = nn.functional.kl_div(log_p, target, reduction="batchmean")
            weight = min(1.0, step / (2 * steps_per_epoch))  # consistency ramp-up
            optimizer.zero_grad(set_to_none=True)
            (supervised + weight * agree).backward()
            optimizer.step()
            decay = ramp.per_step(step)
            soft_update_(teacher, student, decay=decay)  # == tau=1 - decay in RL notation
        results = {"student": scores(student, xv, yv), "teacher": scores(teacher, xv, yv)}
        (sa, sl), (ta, tl) = results["student"], results["teacher"]
        print(f"{epoch:5d}  {decay:.4f}  {sa:.3f} / {sl:.4f}    {ta:.3f} / {tl:.4f}")
        seen["student"].append(sa)
        seen["teacher"].append(ta)
    (sa, sl), (ta, tl) = results["student"], results["teacher"]
    print(f"final: student accuracy {sa:.3f} (loss {sl:.4f}), teacher {ta:.3f} (loss {tl:.4f})")
    last = max(1, epochs // 4)
    for who, accs in seen.items():  # the teacher's predictions move less from epoch to epoch
        tail = np.array(accs[-last:])
        print(f"{who} accuracy over the last {last} epochs: {tail.mean():.3f} +- {tail.std():.3f}")
    return results


if __name__ == "__main__":
    main()
