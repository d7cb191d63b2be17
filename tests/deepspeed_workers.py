"""DeepSpeed on CPU for tests/test_deepspeed.py: process setup, configs, and the worker functions
(each runs in spawned processes, gloo).

Setup facts (DeepSpeed 0.19, CPU): ``DS_ACCELERATOR=cpu`` picks the CPU accelerator, whose
communication backend is gloo; ``deepspeed.comm.torch.build_shm_op`` JIT-compiles a C++ op for
about two minutes that only ``inference_all_reduce`` uses, so it is replaced by a no-op on the
module object before ``init_distributed``; ``deepspeed.initialize`` asserts on ``LOCAL_RANK``,
which no launcher sets here. DeepSpeed clips gradients at norm 1.0 by default: the configs set
``gradient_clipping: 0`` so that a plain torch run is the reference.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import polyak
import polyak.export
from dist_workers import COLLECTIVES

DECAYS = {"a": 0.9, "p": polyak.schedules.power(sigma_rel=0.1)}
DIMS = (13, 31, 5, 3)  # odd sizes: ZeRO-3 partitions are padded


def environment(rank: int, world: int, port: int | None = None) -> None:
    """The variables a launcher would set, DeepSpeed on CPU, one thread, quiet logs."""
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="false",
    )
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives
    warnings.filterwarnings("ignore", message=".*barrier.*")
    import deepspeed
    import deepspeed.comm.torch  # the module object (deepspeed.comm.torch is the torch package)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no 2-minute JIT build
    deepspeed.utils.logger.setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def run(rank: int, world: int, init_file: str, fn: Callable[..., Any], *args: Any) -> None:
    """A plain DeepSpeed process: the gloo group from a file, then DeepSpeed's comm on it."""
    environment(rank, world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        fn(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_launched(rank: int, world: int, port: int, fn: Callable[..., Any], *args: Any) -> None:
    """A process as a launcher starts it (environment only): the framework under test (HF
    Trainer, Accelerate) initialises the process group itself."""
    environment(rank, world, port)
    try:
        fn(rank, world, *args)
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class CountCollectives:
    """Counts calls of the collectives of torch.distributed and of deepspeed.comm while active
    (DeepSpeed binds some torch functions at start-up: its own layer is counted too)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> CountCollectives:
        import deepspeed.comm as ds_comm

        ds_names = [
            n
            for n in dir(ds_comm)
            if re.search(r"gather|scatter|reduce|broadcast|barrier|all_to_all|send|recv", n)
            and callable(getattr(ds_comm, n))
            and not n[0].isupper()
        ]
        for module, names in ((dist, COLLECTIVES), (ds_comm, ds_names)):
            for name in names:
                fn = getattr(module, name)
                self._saved.append((module, name, fn))

                def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                    self.count += 1
                    return _fn(*a, **k)

                setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)
        self._saved.clear()


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    a, b, c, d = DIMS
    return nn.Sequential(
        nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c), nn.ReLU(), nn.Linear(c, d)
    ).to(dtype)


def config(stage: int, **zero: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **zero},
    }
    if "offload_optimizer" in zero or "offload_param" in zero:
        out["zero_force_ds_cpu_optimizer"] = False  # keep the torch optimizer (no cpu_adam JIT)
    return out


def batches(n: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` global batches of 8; each rank trains on its slice."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, DIMS[0], generator=gen), torch.randn(8, DIMS[-1], generator=gen))
        for _ in range(n)
    ]


def train_step(
    engine: Any, batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int
) -> None:
    x, y = batch
    out = engine(x.chunk(world)[rank].to(engine.module[0].weight.dtype))
    loss = nn.functional.mse_loss(out.float(), y.chunk(world)[rank])
    engine.backward(loss)
    engine.step()


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's live weights, gathered (outside any counted update)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    stage3 = hasattr(params[0], "ds_tensor")
    with deepspeed.zero.GatheredParameters(params, enabled=stage3):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def initialize(model: nn.Module, cfg: dict[str, Any], lr: float = 1e-2) -> Any:
    import deepspeed

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


class Reference:
    """A single-process plain-torch run (or a replay of given weights) with its float64 EMA."""

    def __init__(self, initial: dict[str, torch.Tensor] | None = None) -> None:
        self.model = net()
        if initial is not None:
            self.model.load_state_dict({k: v.float() for k, v in initial.items()})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.ema = polyak.EMA(self.model, DECAYS, dtype=torch.float64)

    def train(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        nn.functional.mse_loss(self.model(x), y).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update()

    def replay(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k: v.float() for k, v in weights.items()})
        self.ema.update()


STAGES: dict[str, tuple[dict[str, Any], str]] = {
    # name: (DeepSpeed config, what the EMA is built on)
    "zero1": (config(1), "engine"),
    "zero2": (config(2), "module"),
    # ZeRO-3 with small parameters kept gathered between steps (ds_persist) and large ones not
    "zero3": (config(3, stage3_param_persistence_threshold=40), "engine"),
    "zero3-all-persistent": (config(3), "module"),  # DeepSpeed's default threshold (1e5)
    "zero3-none-persistent": (config(3, stage3_param_persistence_threshold=0), "engine"),
    "zero3-offload": (
        config(
            3,
            stage3_param_persistence_threshold=40,
            offload_param={"device": "cpu"},
            offload_optimizer={"device": "cpu"},
        ),
        "engine",
    ),
    "zero3-bf16": (
        {**config(3, stage3_param_persistence_threshold=40), "bf16": {"enabled": True}},
        "engine",
    ),
    # the model partitioned by zero.Init and the EMA built before deepspeed.initialize, which
    # moves every partition into the optimizer's flat buffer
    "zero3-init": (config(3, stage3_param_persistence_threshold=40), "before"),
}
STEPS = 6
PROBE = torch.randn(4, DIMS[0], generator=torch.Generator().manual_seed(3))


def _cloned(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _cloned(v) for k, v in state.items()}
    return state


def _swap_checks(engine: Any, ema: polyak.EMA) -> dict[str, Any]:
    """Swapped evaluation, live weights after it, copy_to, and the refused module views."""
    params = list(engine.module.parameters())
    parts = [p.ds_tensor.clone() for p in params]
    with torch.no_grad():
        live = engine(PROBE)
        with ema.swapped(engine.module, "a"):
            averaged = engine(PROBE)
        live_again = engine(PROBE)
    out = {
        "live": live,
        "averaged": averaged,
        "live_again": live_again,
        "partitions_back": all(torch.equal(p.ds_tensor, q) for p, q in zip(params, parts)),
        "persistent": sorted(n for n, p in engine.module.named_parameters() if p.ds_persist),
    }
    for what, call in (
        ("get_module", ema.get_module),
        ("averaged_state_dict", ema.averaged_state_dict),
    ):
        try:
            call("a")
        except TypeError as e:
            out[what] = str(e)
    ema.copy_to(engine.module, "a")
    with torch.no_grad():
        out["copied"] = engine(PROBE)
    return out


def stages_match_a_plain_run(rank: int, world: int, out: str) -> None:
    """Every ZeRO stage and variant: 6 steps of training, an EMA updated after each (its
    collectives counted), gathered, against a single-process plain-torch run of the same
    training (bf16: a replay of the engine's own gathered weights)."""
    import deepspeed

    results: dict[str, Any] = {}
    data = batches(STEPS)
    for name, (cfg, build) in STAGES.items():
        if build == "before":
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = net()
            ema = polyak.EMA(model, DECAYS)
            engine = initialize(model, cfg)
        else:
            engine = initialize(net(), cfg)
            ema = polyak.EMA(engine if build == "engine" else engine.module, DECAYS)
        ref = Reference(full_weights(engine) if "bf16" in name else None)
        counted, trained = CountCollectives(), CountCollectives()
        for batch in data:
            with trained:
                train_step(engine, batch, rank, world)
            with counted:
                ema.update()
            if "bf16" in name:
                ref.replay(full_weights(engine))
            else:
                ref.train(batch)
        layout = ema.layout()
        sizes = [None] * world
        dist.all_gather_object(
            sizes, (ema.nbytes, sum(t.shape[0] for t in layout.values() if t.sharded))
        )
        result = {
            "full": ema.state_dict(full=True),
            "ref": ref.ema.state_dict(),
            "update_collectives": counted.count,
            "train_collectives": trained.count,
            "sizes": sizes,
            "names": list(layout),
            "layout": {
                n: (t.shape, t.global_shape, t.offset, t.flat_offset, t.sharded)
                for n, t in layout.items()
            },
        }
        if name == "zero3":
            result.update(_swap_checks(engine, ema))
        results[name] = _cloned(result)
        engine.destroy()
    if rank == 0:
        torch.save(results, out)


def fsdp_net() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = net()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def save_resume_and_fsdp(rank: int, world: int, out: str) -> None:
    """ZeRO-3 run saving at step 3 (per-rank EMA states, a full one, DeepSpeed's checkpoint);
    resumed from each to step 6; the final full state loaded into FSDP2."""
    cfg = STAGES["zero3"][0]
    data = batches(STEPS)
    engine = initialize(net(), cfg)
    ema = polyak.EMA(engine, DECAYS)
    for t, batch in enumerate(data, 1):
        train_step(engine, batch, rank, world)
        ema.update()
        if t == 3:
            torch.save(_cloned(ema.state_dict()), f"{out}/rank{rank}.pt")
            full = ema.state_dict(full=True)
            if rank == 0:
                torch.save(full, f"{out}/full3.pt")
            engine.save_checkpoint(f"{out}/ckpt", tag="step3")
    final = ema.state_dict(full=True, rank0_only=False)  # on every rank
    if rank == 1:  # inf/nan in one rank's partition: export must stop both ranks, not hang
        with torch.no_grad():
            ema.averaged_tensors("a")["2.weight"].fill_(float("nan"))
    try:
        polyak.export.averaged_state_dict(ema, "a")
        error = None
    except polyak.NonFiniteError as e:
        error = str(e)
    export_errors: list[Any] = [None] * world
    dist.all_gather_object(export_errors, error)
    engine.destroy()
    resumed = {}
    for source in ("rank", "full"):
        dist.barrier()
        engine = initialize(net(), cfg)
        engine.load_checkpoint(f"{out}/ckpt", tag="step3")
        ema = polyak.EMA(engine, DECAYS)
        path = f"{out}/rank{rank}.pt" if source == "rank" else f"{out}/full3.pt"
        ema.load_state_dict(torch.load(path, weights_only=True))
        for batch in data[3:]:
            train_step(engine, batch, rank, world)
            ema.update()
        resumed[source] = ema.state_dict(full=True)
        engine.destroy()
    fsdp = polyak.EMA(fsdp_net(), DECAYS)
    fsdp.load_state_dict(final)
    fsdp_full = fsdp.state_dict(full=True)
    try:
        fsdp.load_state_dict(torch.load(f"{out}/rank{rank}.pt", weights_only=True))
        refused = ""
    except ValueError as e:
        refused = str(e)
    if rank == 0:
        torch.save(final, f"{out}/final.pt")
        torch.save(
            {
                "resumed": resumed,
                "fsdp": fsdp_full,
                "refused": refused,
                "export_errors": export_errors,
            },
            f"{out}/out.pt",
        )


def load_at_three_ranks(rank: int, world: int, out: str) -> None:
    """The 2-rank ZeRO-3 state loaded on 3 ranks: full into ZeRO-2 and ZeRO-3, per-rank refused."""
    final = torch.load(f"{out}/final.pt", weights_only=True)
    got: dict[str, Any] = {}
    for stage in (2, 3):
        engine = initialize(net(), config(stage, stage3_param_persistence_threshold=40))
        ema = polyak.EMA(engine, DECAYS)
        ema.load_state_dict(final)
        got[f"zero{stage}"] = ema.state_dict(full=True)
        if stage == 3:
            try:  # rank 2 has its own error; the others learn which rank failed
                ema.load_state_dict(torch.load(f"{out}/rank{min(rank, 1)}.pt", weights_only=True))
            except (ValueError, RuntimeError) as e:
                got["error"] = f"{type(e).__name__}: {e}"
            errors = [None] * world
            dist.all_gather_object(errors, got.pop("error", None))
            got["errors"] = errors
        engine.destroy()
    if rank == 0:
        torch.save(got, f"{out}/three.pt")


def _halved(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def _full_fsdp(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def sharded_pairs(rank: int, world: int, out: str) -> None:
    """A ZeRO-3 target (an engine without optimizer) kept by TargetEMA from a ZeRO-3 online
    engine, and an FSDP2 pair updated with soft_update_, against unsharded copies; collectives
    counted; mismatched shardings refused."""
    import deepspeed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from polyak.workflows import TargetEMA, hard_update_, soft_update_

    cfg = STAGES["zero3"][0]
    online = initialize(net(), cfg)
    target, *_ = deepspeed.initialize(model=_halved(net()), config=cfg)
    ref = Reference()
    ref_target = _halved(net())
    decay = polyak.schedules.warmup(0.9)
    teacher = TargetEMA(target, online, decay, update_every=2)
    ref_teacher = TargetEMA(ref_target, ref.model, decay, update_every=2)
    counted = CountCollectives()
    outputs = []
    for batch in batches(STEPS):
        with torch.no_grad():  # the teacher's forward, as in training: from the second on,
            outputs.append(target(PROBE) - ref_target(PROBE))  # persistent weights stay gathered
        train_step(online, batch, rank, world)
        ref.train(batch)
        with counted:
            teacher.update()
        ref_teacher.update()
    with torch.no_grad():
        outputs.append(target(PROBE) - ref_target(PROBE))
    res: dict[str, Any] = {"target_vs_ref": max(d.abs().max().item() for d in outputs)}
    res["zero3_target"] = full_weights(target)
    res["ref_target"] = {k: v.detach().clone() for k, v in ref_target.named_parameters()}
    res["teacher_collectives"] = counted.count
    res["teacher_step"] = teacher.timeline.num_updates
    with counted:
        hard_update_(target, online)
    with torch.no_grad():
        res["hard_out"], res["online_out"] = target(PROBE), online(PROBE)
    errors = {}
    for what, (t, o) in {
        "plain target": (net(), online),
        "FSDP2 target": (fsdp_net(), online),
    }.items():
        try:
            soft_update_(t, o, tau=0.1)
        except ValueError as e:
            errors[what] = str(e)
    online.destroy()
    target.destroy()
    # FSDP2: the same pair, soft-updated shard by shard
    fsdp_online, fsdp_target = fsdp_net(), _halved(fsdp_net())
    plain_online, plain_target = net(), _halved(net())
    with torch.no_grad():
        fsdp_target(PROBE)  # a no_grad forward leaves the full weights registered
    with counted:
        soft_update_(fsdp_target, fsdp_online, tau=0.3)
        soft_update_(fsdp_target, fsdp_online, decay=0.5)
    soft_update_(plain_target, plain_online, tau=0.3)
    soft_update_(plain_target, plain_online, decay=0.5)
    res["fsdp_target"] = _full_fsdp(fsdp_target)
    res["plain_target"] = {k: v.detach().clone() for k, v in plain_target.named_parameters()}
    hybrid = net()  # HSDP: replicated across the 2 ranks, sharded over 1
    fully_shard(hybrid, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("r", "s")))
    try:
        soft_update_(hybrid, fsdp_online, tau=0.1)
    except ValueError as e:
        errors["HSDP target"] = str(e)
    res["errors"] = errors
    res["collectives"] = counted.count
    if rank == 0:
        torch.save(res, out)


def hf_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 600},
    }


def _hf_trainer(out: str, stage: int, callbacks: list[Any], save: bool = True) -> Any:
    from transformers import Trainer, TrainingArguments

    from test_integrations_transformers import TRAIN, gpt2

    args = TrainingArguments(
        out,
        deepspeed=hf_config(stage),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=6,
        save_strategy="steps" if save else "no",
        save_steps=3,
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=gpt2(), args=args, train_dataset=TRAIN, callbacks=callbacks)


class _Record:
    """The live weights (gathered) at the start and after each optimizer step, as a callback."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class Record(TrainerCallback):
            def __init__(self) -> None:
                self.states: list[dict[str, torch.Tensor]] = []

            def _keep(self, model: nn.Module) -> None:
                import deepspeed

                params = list(model.parameters())
                with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
                    self.states.append(
                        {k: v.detach().clone() for k, v in model.state_dict().items()}
                    )

            def on_train_begin(
                self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
            ) -> None:
                self._keep(model)

            def on_step_end(
                self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
            ) -> None:
                self._keep(model)

        return Record()


def hf_trainer_zero(rank: int, world: int, out: str) -> None:
    """The HF Trainer with DeepSpeed ZeRO-2, then ZeRO-3: EMACallback trains, checkpoints,
    resumes (ZeRO-3) and exports with save_pretrained."""
    from polyak.integrations.transformers import EMACallback

    decay = polyak.schedules.warmup(0.9)
    res: dict[str, Any] = {}
    for stage in (2, 3):
        record, cb = _Record(), EMACallback(decay)
        _hf_trainer(f"{out}/zero{stage}", stage, [record, cb], save=stage == 3).train()
        res[f"zero{stage}"] = {
            "steps": cb.ema.timeline.num_updates,
            "full": cb.ema.state_dict(full=True),
            "states": record.states,
        }
    resumed = EMACallback(decay)
    _hf_trainer(f"{out}/zero3", 3, [resumed]).train(
        resume_from_checkpoint=f"{out}/zero3/checkpoint-3"
    )
    res["resumed"] = resumed.ema.state_dict(full=True)
    resumed.save_pretrained(f"{out}/average")
    if rank == 0:
        torch.save(res, f"{out}/hf.pt")


def accelerate_zero3(rank: int, world: int, out: str) -> None:
    """Accelerate with a DeepSpeed ZeRO-3 plugin: the EMA registered for checkpointing through
    FullState, saved halfway, resumed in a new Accelerator; and a plain single-process run."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs
    from torch.utils.data import DataLoader, TensorDataset

    from polyak.integrations.accelerate import FullState

    data = batches(STEPS)
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))

    plugin = DeepSpeedPlugin(hf_ds_config=config(3, stage3_param_persistence_threshold=40))

    def setup(first: bool) -> tuple[Any, ...]:
        accelerator = Accelerator(  # not cpu=True, which drops the plugin (plain DDP); a second
            deepspeed_plugin=plugin if first else None,  # Accelerator takes the first's plugin
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        )
        model = net()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        loader = DataLoader(dataset, batch_size=4)  # rank r: the r-th half of each global batch
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        ema = polyak.EMA(accelerator.unwrap_model(model), DECAYS)
        accelerator.register_for_checkpointing(FullState(ema))
        return accelerator, model, optimizer, ema, list(loader)

    def steps(accelerator: Any, model: Any, optimizer: Any, ema: polyak.EMA, loader: Any) -> None:
        for x, y in loader:
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            ema.update()

    accelerator, model, optimizer, ema, loader = setup(first=True)
    steps(accelerator, model, optimizer, ema, loader[:3])
    accelerator.save_state(f"{out}/state")
    steps(accelerator, model, optimizer, ema, loader[3:])
    whole = ema.state_dict(full=True)
    accelerator, model, optimizer, ema, loader = setup(first=False)
    accelerator.load_state(f"{out}/state")
    resumed_at = ema.step
    steps(accelerator, model, optimizer, ema, loader[3:])
    resumed = ema.state_dict(full=True)
    ref = Reference()
    for batch in data:
        ref.train(batch)
    if rank == 0:
        torch.save(
            {"whole": whole, "resumed": resumed, "at": resumed_at, "ref": ref.ema.state_dict()},
            f"{out}/accelerate.pt",
        )


def zero_runs(rank: int, world: int, out: str) -> None:
    """Everything that runs on 2 plain DeepSpeed processes, in one spawned pair (the first
    ``deepspeed.initialize`` of a process costs seconds, the next ones less than 2)."""
    stages_match_a_plain_run(rank, world, f"{out}/stages.pt")
    save_resume_and_fsdp(rank, world, out)
    sharded_pairs(rank, world, f"{out}/pairs.pt")
