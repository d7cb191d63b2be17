"""JAX: averages of a Flax NNX model's weights, updated inside the jitted train step.

Trains a BatchNorm MLP on scikit-learn's bundled digits with SGD at a high learning rate, keeps
three averages of its parameters and BatchNorm statistics in one ``polyak.jax`` state, and after
every epoch prints the validation accuracy and loss of the live weights and of each average
(evaluated by swapping the average into the model, then swapping the weights back).

    python examples/jax_ema.py            # ~10 s on 2 CPU cores
    python examples/jax_ema.py --fast     # a few seconds (used by CI)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import polyak.jax as pj
from polyak import schedules
from polyak.cli.study.data import load_digits

AVERAGED = (nnx.Param, nnx.BatchStat)  # what the averages cover: weights and BN statistics


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.norm = nnx.BatchNorm(128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, ema: pj.EMAState, x, y) -> pj.EMAState:
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return pj.update(ema, nnx.state(model, AVERAGED))  # traced: compiled once, no host sync


@nnx.jit
def evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return (logits.argmax(-1) == y).mean(), loss


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for CI")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.fast else 20)

    data = load_digits(seed=0)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xv, yv = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9, nesterov=True), wrt=nnx.Param)
    ema = pj.init(
        nnx.state(model, AVERAGED),
        decay={  # several averages in one state, updated in one traced function
            "ema-0.99": 0.99,  # constant decay: half-life ~69 steps
            "warmup-0.999": schedules.warmup(0.999),  # TF-style warm-up (n+1)/(n+10)
            "power-0.10": schedules.power(sigma_rel=0.10),  # EDM2 power average
        },
        # inf/nan weights (a diverging run at this learning rate) never enter the averages;
        # inside the jitted step the error is raised at the next pj.swapped, naming the leaves
        nonfinite="raise",
    )

    rng = np.random.default_rng(0)
    results: dict[str, tuple[float, float]] = {}
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in np.array_split(rng.permutation(len(x)), len(x) // 32):
            ema = train_step(model, optimizer, ema, x[idx], y[idx])
        model.eval()
        results = {"live": tuple(map(float, evaluate(model, xv, yv)))}
        for name in ema.names:
            with pj.swapped(model, ema, name):  # the average in, the live weights back after
                results[name] = tuple(map(float, evaluate(model, xv, yv)))
        row = "  ".join(f"{k} {acc:.3f}/{loss:.3f}" for k, (acc, loss) in results.items())
        print(f"epoch {epoch:2d}  (val acc/loss)  {row}", flush=True)
    print(f"{int(ema.step)} optimizer steps, {int(ema.num_updates)} updates of each average")
    return results


if __name__ == "__main__":
    main()
