"""The timed tables of ``polyak bench``: every candidate of a shape, and several averages."""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from polyak import EMA
from polyak.cli.bench.candidates import Candidate, clone_model, measure_update, memory_of
from polyak.cli.bench.models import build_model, describe
from polyak.cli.bench.peers import make_peer
from polyak.cli.bench.probes import python_overhead
from polyak.types import NonFinite

__all__ = ["Flusher", "run_multi", "run_shape", "time_interleaved"]


class Flusher:
    """Leaves the caches as an optimizer step would before each timed call.

    It reads ``mib`` MiB, so no weight or average is cached (reads, not writes: dirty lines
    would make the next call pay their write-back), then reads the metadata of every parameter
    and buffer of the models in ``walk``, as ``optimizer.step()`` does just before
    ``ema.update()``. Without that walk every candidate would also pay for cold Python objects,
    which no training loop leaves cold.
    """

    def __init__(self, mib: int) -> None:
        self.buffer = torch.ones(mib * 2**18) if mib else None
        self.out = torch.zeros(())
        self.walk: list[torch.Tensor] = []

    def watch(self, *models: nn.Module) -> None:
        self.walk = [t for m in models for t in (*m.parameters(), *m.buffers())]

    def __call__(self) -> None:
        if self.buffer is not None:
            torch.sum(self.buffer, dim=0, out=self.out)
        for t in self.walk:
            t.data_ptr()


def time_interleaved(
    candidates: Sequence[Candidate],
    repeats: int,
    flush: Callable[[], None],
    seed: int,
    budget_s: float = float("inf"),
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``repeats`` rounds in a shuffled order each, fewer
    (but at least 5) when the rounds run past ``budget_s``."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for c in candidates:  # warm up: first-call work (lazy init, page faults) is not timed
        c()
    deadline = time.perf_counter() + budget_s
    for done in range(repeats):
        if done >= 5 and time.perf_counter() > deadline:
            break
        order = list(candidates)
        rng.shuffle(order)
        for c in order:
            flush()
            t0 = time.perf_counter()
            c()
            times[c.name].append(time.perf_counter() - t0)
    return times


def _tracked(model: nn.Module) -> list[torch.Tensor]:
    """The tensors polyak averages by default: floating parameters and buffers."""
    out = list(model.parameters())
    return out + [b for b in model.buffers() if b.is_floating_point()]


def _perturb_(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in _tracked(model):
            t.add_((0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype))


def _copy_values_(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for a, b in zip(_tracked(dst), _tracked(src)):
            a.copy_(b)


def _polyak(
    name: str,
    model: nn.Module,
    decays: Any,
    *,
    flat: bool = False,
    count: int = 1,
    compiled: bool = False,
    nonfinite: NonFinite = "propagate",
) -> Candidate:
    """``count`` polyak EMAs on ``model`` updated together (one candidate)."""
    names = [n for n, _ in model.named_parameters()]

    def build() -> list[EMA]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_ema = [decays] if count == 1 else list(decays)
            return [
                EMA(model, d, flat_params=flat, compile_update=compiled, nonfinite=nonfinite)
                for d in per_ema
            ]

    # what an EMA holds is its storage: the profiler would also count flat_params moving the
    # weights into a new buffer, but not the freeing of their old storage (allocated earlier)
    emas = build()
    held = sum(e.nbytes for e in emas)

    def averages() -> list[list[torch.Tensor]]:
        rows = []
        for e in emas:
            for avg in e.names:
                views = e.averaged_tensors(avg)
                rows.append([views[n] for n in names])
        return rows

    def update() -> None:
        for e in emas:
            e.update()

    flat_decays = tuple(decays) if isinstance(decays, (list, tuple)) else (decays,)
    kernels = sum(e._update_lists(e.names[0]).launches for e in emas)  # launches: all averages
    c = Candidate(name, "polyak", emas[0].update if count == 1 else update, averages, flat_decays)
    c.held = held
    c.extra["kernels"] = kernels
    c.extra["emas"] = emas
    if compiled:  # the first update compiles: time it apart
        t0 = time.perf_counter()
        c()
        c.extra["first_update_s"] = time.perf_counter() - t0
    return c


def _references(default: Candidate, flat: Candidate, decay: float) -> list[Candidate]:
    """The bare kernels on the same memory as polyak's candidates (same bytes, same placement:
    buffers of the same size can differ by 10-20% here by where their pages landed).

    ``lerp (flat)``: ``lerp_`` of each average row of the flat EMA towards its live span;
    ``foreach (cached lists)``: ``torch._foreach_lerp_`` of the default EMA's averages towards
    the model's tensors (fp32 models); ``copy (flat)``: a copy of the flat live span. A reference
    call is an update of its polyak candidate, and is counted for its float64 check.
    """
    w = 1.0 - decay
    (ema_flat,) = flat.extra["emas"]
    runs = [pair for avgs, spans in ema_flat._update_lists().averaged for pair in zip(avgs, spans)]
    n = sum(span.numel() for _, span in runs)
    dst = torch.zeros(n)

    @torch.no_grad()
    def lerp() -> None:
        for row, span in runs:
            row.lerp_(span, w)
        flat.calls += 1

    pairs, offset = [], 0
    for _, span in runs:
        pairs.append((dst[offset : offset + span.numel()], span))
        offset += span.numel()

    @torch.no_grad()
    def copy() -> None:
        for out, span in pairs:
            out.copy_(span)

    out = [
        Candidate("copy (flat)", "reference", copy, note="copy_ of the flat weights"),
        Candidate("lerp (flat)", "reference", lerp, note="lerp_ over the flat weights"),
    ]
    out[0].held = 4 * n
    (ema,) = default.extra["emas"]
    lists = ema._update_lists().averaged
    if all(a.dtype == s.dtype for avgs, sources in lists for a, s in zip(avgs, sources)):
        # the very lists the update lerps (same dtypes: no staged cast); no copied tensors
        @torch.no_grad()
        def foreach() -> None:
            for avgs, lives in lists:
                torch._foreach_lerp_(avgs, lives, w)
            default.calls += 1

        out.append(
            Candidate(
                "foreach (cached lists)",
                "reference",
                foreach,
                note="torch._foreach_lerp_ over the model's tensors",
            )
        )
    return out


def _check(c: Candidate, live0: list[torch.Tensor], model: nn.Module) -> dict[str, float]:
    """Max normwise relative error against float64, and the fraction of the float64 movement
    achieved (1.0: tracks; 0.0: frozen), over the updates since the weights were perturbed."""
    assert c.averages is not None
    live1 = list(model.parameters())
    worst, moved, wanted = 0.0, 0.0, 0.0
    for row, d in zip(c.averages(), c.decays):
        factor = d ** (c.calls - c.extra["calls_before"])
        for got, a, b in zip(row, live0, live1):
            a64, b64 = a.detach().double(), b.detach().double()
            exp = b64 + (a64 - b64) * factor
            scale = exp.abs().max().item() or 1.0
            worst = max(worst, (got.detach().double() - exp).abs().max().item() / scale)
            moved += (got.detach().double() - a64).abs().sum().item()
            wanted += (exp - a64).abs().sum().item()
    return {"err": worst, "moved": moved / wanted if wanted else 1.0}


def _rows(cands: Sequence[Candidate], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for c in cands:
        ts = sorted(times[c.name])
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows.append(
            {
                "name": c.name,
                "kind": c.kind,
                "note": c.note,
                "median_s": statistics.median(ts),
                "q1_s": q[0],
                "q3_s": q[2],
                "min_s": ts[0],
                "rounds": len(ts),
                "samples_s": times[c.name],  # in round order: paired ratios
                "held_bytes": c.held,
                **c.extra.get("measured", {}),
                **{
                    k: v
                    for k, v in c.extra.items()
                    if k in ("kernels", "err", "moved", "first_update_s")
                },
            }
        )
    return rows


def _peers(
    names: Sequence[str], model: nn.Module, decay: float, skipped: dict[str, str]
) -> list[Candidate]:
    out = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")

                def build(name: str = name) -> Candidate:
                    return make_peer(name, model, decay)

                c, held = memory_of(build)
                c()  # the baseline call: peers whose first update copies do it here
        except Exception as e:  # any failure means: skip with the reason, never crash
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  skipping {name}: {skipped[name]}", flush=True)
            continue
        c.held = held
        c.decays = (decay,)
        out.append(c)
    return out


def run_shape(shape: str, config: Any, flush: Callable[[], None]) -> dict[str, Any]:
    """Time every candidate on ``shape`` and check each against float64."""
    t_start = time.perf_counter()
    print(f"[{shape}] building models and candidates", flush=True)
    gen = torch.Generator().manual_seed(config.seed)
    decay = config.decay
    model = build_model(shape, config.scale, config.seed)
    flat_model = clone_model(model)
    checks: list[tuple[Candidate, nn.Module, list[torch.Tensor]]] = []
    cands = [
        _polyak("polyak", model, decay),
        _polyak("polyak flat_params", flat_model, decay, flat=True),
    ]
    models = [model, model]
    extra_models: list[nn.Module] = []
    if shape == "transformer-bf16":
        fp32 = build_model("transformer", config.scale, config.seed)
        fp32_flat = clone_model(fp32)
        compiled_model = clone_model(model)
        cands += [
            _polyak("polyak (fp32 model)", fp32, decay),
            _polyak("polyak flat_params (fp32 model)", fp32_flat, decay, flat=True),
        ]
        if config.compile:
            cands.append(
                _polyak(
                    "polyak flat_params compile_update",
                    compiled_model,
                    decay,
                    flat=True,
                    compiled=True,
                )
            )
        models += [fp32, fp32]
        extra_models = [fp32, fp32_flat]
    if shape == "transformer":  # what guarding against inf/nan costs per update
        modes: tuple[NonFinite, ...] = ("raise", "skip")
        for mode in modes:
            cands.append(_polyak(f"polyak nonfinite={mode}", model, decay, nonfinite=mode))
            models.append(model)
    base = 2 if shape == "transformer-bf16" else 0  # the fp32 model's candidates there
    refs = _references(cands[base], cands[base + 1], decay)
    skipped: dict[str, str] = {}
    peer_names = list(config.peers)
    if shape == "transformer-bf16" and "timm-V3" in peer_names:
        peer_names.insert(peer_names.index("timm-V3") + 1, "timm-V3-fp32")
    peers = _peers(peer_names, model, decay, skipped)
    for c in cands:
        c()  # baseline call on the unperturbed weights
    live0 = {id(m): [p.detach().clone() for p in m.parameters()] for m in (model, *extra_models)}
    for c in cands + peers:
        c.extra["calls_before"] = c.calls
    _perturb_(model, gen)
    _copy_values_(flat_model, model)
    if shape == "transformer-bf16" and config.compile:
        _copy_values_(compiled_model, model)
    if extra_models:
        _perturb_(extra_models[0], gen)
        _copy_values_(extra_models[1], extra_models[0])
        live0[id(extra_models[1])] = live0[id(extra_models[0])]
    checks = [(c, m, live0[id(m)]) for c, m in zip(cands, models)]
    checks[1] = (cands[1], flat_model, live0[id(model)])
    if extra_models:
        checks[3] = (cands[3], extra_models[1], live0[id(extra_models[0])])
    if shape == "transformer-bf16" and config.compile:
        checks.append((cands[4], compiled_model, live0[id(model)]))
    checks += [(c, model, live0[id(model)]) for c in peers]
    every = cands + refs + peers
    if isinstance(flush, Flusher):
        flush.watch(model, flat_model, *extra_models)
    print(
        f"[{shape}] timing {len(every)} candidates x {config.repeats} rounds "
        f"(+{len(skipped)} skipped)",
        flush=True,
    )
    times = time_interleaved(every, config.repeats, flush, config.seed, config.budget_s)
    for c in every:
        c.extra["measured"] = measure_update(c)
    for c, m, l0 in checks:
        if c.averages is not None:
            c.extra.update(_check(c, l0, m))
    bf16 = shape == "transformer-bf16"
    section_overhead = {} if bf16 else python_overhead(shape, config)
    info = describe(model)
    live_bytes = sum(t.numel() * t.element_size() for t in _tracked(model))
    elements = sum(t.numel() for t in _tracked(model))
    section = {
        "shape": shape,
        "model": info,
        "live_dtype": str(next(model.parameters()).dtype),
        "elements": elements,
        "min_bytes": live_bytes + 2 * 4 * elements,  # read live, read+write an fp32 average
        "rows": _rows(every, times),
        "python_overhead_s": section_overhead,
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
    }
    return section


def run_multi(shape: str, config: Any, flush: Callable[[], None]) -> dict[str, Any]:
    """One EMA with ``K`` decays against ``K`` EMAs, scattered and flat weights."""
    k = config.multi
    decays = [1.0 - 10.0 ** -(i + 1) for i in range(k)]
    print(f"[{shape}] {k} averages: one EMA vs {k} EMAs", flush=True)
    model = build_model(shape, config.scale, config.seed)
    flat_model = clone_model(model)
    sep, sep_flat = f"{k} separate polyak EMAs", f"{k} separate polyak flat_params EMAs"
    cands = [
        _polyak(f"polyak, {k} averages in one EMA", model, decays),
        _polyak(sep, model, decays, count=k),
        _polyak(f"polyak flat_params, {k} averages in one EMA", flat_model, decays, flat=True),
        _polyak(sep_flat, flat_model, decays, flat=True, count=k),
    ]
    against = {cands[0].name: sep, cands[2].name: sep_flat}
    if config.compile:
        c = _polyak(
            f"polyak flat_params compile_update, {k} averages in one EMA",
            flat_model,
            decays,
            flat=True,
            compiled=True,
        )
        cands.append(c)
        against[c.name] = sep_flat
    for c in cands:
        c()
        c.extra["calls_before"] = c.calls
    live0 = [p.detach().clone() for p in model.parameters()]
    _perturb_(model, torch.Generator().manual_seed(config.seed))
    _copy_values_(flat_model, model)
    if isinstance(flush, Flusher):
        flush.watch(model, flat_model)
    times = time_interleaved(cands, config.repeats, flush, config.seed, config.budget_s)
    for c in cands:
        c.extra["measured"] = measure_update(c)
        c.extra.update(_check(c, live0, model if "flat" not in c.name else flat_model))
    rows = _rows(cands, times)
    for r in rows:
        r["against"] = against.get(r["name"])
    return {"shape": shape, "k": k, "decays": decays, "rows": rows}
