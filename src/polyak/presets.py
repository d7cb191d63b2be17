"""Published averaging protocols, reproduced exactly (pure core).

Each preset returns the keyword arguments of :class:`polyak.EMA` / :class:`polyak.ArrayEMA`::

    ema = polyak.EMA(model, **polyak.presets.morales_brotons())
"""

from __future__ import annotations

from typing import Any

from polyak import schedules

__all__ = ["MORALES_BROTONS_DECAYS", "edm2", "morales_brotons"]

MORALES_BROTONS_DECAYS = (0.968, 0.984, 0.992, 0.996, 0.998)


def morales_brotons(period: int = 16) -> dict[str, Any]:
    """The five EMAs of Morales-Brotons, Vogels & Hendrikx (TMLR 2024), exactly as they ran them.

    Decays 0.968, 0.984, 0.992, 0.996 and 0.998 *per EMA update*, one update every 16 optimizer
    steps, each with the warm-up ``min(alpha, (s+1)/(s+10))`` where ``s`` counts EMA updates from
    0 (their ``OptimizerEMA``). Counting the warm-up per update rather than per step matters:
    0.998 is only reached after 4490 updates (~72k steps), so for most of a CIFAR run the "0.998"
    average is a power-function average: before the cap ``1 - decay = 9/(s+10)``, EDM2's power
    function with ``gamma ~ 8``, ``sigma_rel ~ 0.09`` (Karras et al., CVPR 2024, Sec. 3). Their
    floating buffers are averaged (``eman=True``), which is :class:`polyak.EMA`'s default;
    recompute BN statistics before evaluating, as they report. (Their first EMA update follows
    optimizer step 1, ours step 16; the k-th update's decay is identical.)

    Returns:
        ``{"decay": {name: schedule}, "update_every": period}``.

    Examples:
        >>> kw = morales_brotons()
        >>> list(kw["decay"]), kw["update_every"]
        (['0.968', '0.984', '0.992', '0.996', '0.998'], 16)
    """
    decay = {
        f"{a:g}": schedules.warmup(a, period=period, count_from=0) for a in MORALES_BROTONS_DECAYS
    }
    return {"decay": decay, "update_every": period}


def edm2(sigma_rels: tuple[float, ...] = (0.05, 0.10)) -> dict[str, Any]:
    """EDM2's two power-function averages (Karras et al. 2024): ``sigma_rel`` 0.05 and 0.10.

    Returns:
        ``{"decay": {name: power schedule}}``; buffers follow the EMA default.

    Examples:
        >>> list(edm2()["decay"])
        ['power(sigma_rel=0.05)', 'power(sigma_rel=0.1)']
    """
    chosen = [schedules.power(sigma_rel=s) for s in sigma_rels]
    return {"decay": {s.name: s for s in chosen}}
