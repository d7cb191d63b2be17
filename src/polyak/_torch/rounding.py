"""bfloat16 averages with stochastic rounding: the memory-saving opt-in that does not freeze.

With round-to-nearest, a bf16 average loses every update smaller than half an ulp, so at decay
0.999 it only follows weights that differ from it by more than 2-4x their size (Zamirai et al.
2020, "Revisiting BFloat16 Training"). Stochastic rounding (SR) rounds ``x`` up with
probability equal to its distance from the bf16 value below, so ``E[SR(x)] = x`` exactly and
small updates survive on average. For a float32 ``x`` this is: add a uniform 16-bit integer to its
bit pattern and clear the low 16 bits (the carry rounds up with the right probability, also for
negative numbers, whose magnitude it rounds). The result is exactly representable in bf16, so the
final cast is exact.

Each update is computed in float32 (the live weights cast, the lerp, then SR back to bf16). The
noise comes from a private generator reseeded at every update from ``(seed, number of updates so
far, group)``: the stream does not depend on the global RNG, is identical on every rank given the
same seed, and resumes exactly from a state dict (which holds the update count).

Measured error against float64 (``polyak bench``, precision section: 4096 weights with
magnitudes 1e-3..1, a 5% drift over 20000 steps plus 1% noise per step; "movement" is how far
the float64 average moved from its start):

    ======  ============================  ========  ==============  ===========  ==============
    decay   storage                       movement  median rel err  p99 rel err  err / movement
    ======  ============================  ========  ==============  ===========  ==============
    0.999   float32 (default)             1.000     3.6e-07         1.6e-06      0.00
    0.999   bfloat16, round-to-nearest    0.000     4.5e-02         4.9e-02      1.00 (frozen)
    0.999   bfloat16, stochastic rounding 0.999     3.4e-03         1.3e-02      0.08
    0.9999  float32 (default)             1.000     1.1e-06         4.8e-06      0.00
    0.9999  bfloat16, round-to-nearest    0.000     2.8e-02         3.1e-02      1.00 (frozen)
    0.9999  bfloat16, stochastic rounding 0.992     5.0e-03         1.9e-02      0.18
    ======  ============================  ========  ==============  ===========  ==============

So SR follows the float64 average without bias where round-to-nearest does not move at all,
but each weight carries noise of about one bf16 ulp (relative 2**-8..2**-7), which the decay
does not average away: the rounding noise of every step is kept with weight ``decay`` like any
update. Keep float32 unless the memory of the average matters more than that noise.

Caveat: a NaN whose payload fills the top of the mantissa can carry into the sign bit and come
out as zero; ordinary NaNs (``0x7fc00000``) and infinities are preserved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak._torch.groups import Gate, StagedGroup
from polyak._torch.segments import Segment

__all__ = ["RoundedGroup", "seed_for", "stochastic_round_"]

_MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints that scatters nearby inputs."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_for(seed: int, *parts: int) -> int:
    """A 63-bit generator seed from ``seed`` and ``parts``: unrelated streams for nearby inputs."""
    h = _mix(seed & _MASK64)
    for p in parts:
        h = _mix(h ^ _mix(p & _MASK64))
    return h >> 1


def _mask(device: torch.device) -> torch.Tensor:
    # 0xFFFF0000 as int32: keep sign, exponent and the top 7 mantissa bits. A tensor, because
    # a Python-int operand of bitwise_and_ is wrapped into a fresh tensor at every call.
    return torch.tensor(-65536, dtype=torch.int32, device=device)


def stochastic_round_(
    value: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round float32 ``value`` in place to a bf16-representable float32, unbiased
    (``E[result] = value``); a cast to bf16 afterwards is exact. ``value`` must be contiguous;
    ``noise`` is int32 scratch of the same size; ``mask`` an optional cached ``_mask``. With
    the mask given, allocates nothing. Returns ``value``."""
    noise.random_(0, 1 << 16, generator=generator)
    bits = value.view(torch.int32)
    bits.add_(noise)
    bits.bitwise_and_(_mask(value.device) if mask is None else mask)
    return value


class RoundedGroup(StagedGroup):
    """bf16 averages: each chunk is cast up, lerped in float32 and stochastically rounded back.

    The staging (live pieces cast into a float32 scratch, zeroed by a closed gate) is that of
    :class:`~polyak._torch.groups.StagedGroup`; each row is then copied into a second float32
    scratch, lerped there and rounded back into the bf16 average.
    """

    def __init__(
        self,
        segments: list[Segment],
        seed: int,
        group: int,
        chunk: int | None = None,
        gate: Gate | None = None,
    ) -> None:
        super().__init__(segments, chunk, gate=gate, scratch_dtype=torch.float32)
        dev = self.scratch.device
        self.seed, self.group = seed, group
        self.value = torch.empty_like(self.scratch)
        self.noise = torch.empty(self.scratch.numel(), dtype=torch.int32, device=dev)
        self.generator = torch.Generator(device=dev)
        self.mask = _mask(dev)
        self.values = []
        for scratch, *_, used in self.batches:
            offsets = [v.data_ptr() - self.scratch.data_ptr() for v in scratch]
            size = self.scratch.element_size()
            self.values.append(
                (
                    [self.value[o // size : o // size + v.numel()].view(v.shape)
                     for o, v in zip(offsets, scratch)],
                    self.value[: used.numel()],
                    self.noise[: used.numel()],
                )
            )  # fmt: skip

    @property
    def launches(self) -> int:
        return sum(len(b[0]) for b in self.batches) * (2 + 3 * self.k)

    def reseed(self, updates: int) -> None:
        """Start the noise stream of update number ``updates`` (a pure function of it)."""
        self.generator.manual_seed(seed_for(self.seed, updates, self.group))

    def apply(self, decays: Sequence[float]) -> None:
        gated = self.gate is not None
        if gated:
            self.weights.set(decays)
        for (scratch, batch, rows, _, _, used), (values, value_span, noise_span) in zip(
            self.batches, self.values
        ):
            self._stage(scratch, batch, used)
            for k, (row, d) in enumerate(zip(rows, decays)):
                if d == 1.0 and not gated:
                    continue
                if d == 0.0 and not gated:  # a copy rounds to nearest: the best bf16 value
                    torch._foreach_copy_(row, scratch)
                    continue
                torch._foreach_copy_(values, row)
                if gated:
                    torch._foreach_lerp_(values, scratch, [self.weights.tensor[k]] * len(values))
                else:
                    torch._foreach_lerp_(values, scratch, 1.0 - d)
                stochastic_round_(value_span, noise_span, self.generator, self.mask)
                torch._foreach_copy_(row, values)
