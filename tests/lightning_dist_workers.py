"""The worker of the Lightning DDP / FSDP2 test: 2 CPU processes, gloo, launched by the test
the way ``torchrun`` would (``LOCAL_RANK`` set, so Lightning starts no processes itself)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def fits(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_helpers import Regression, data, trainer
    from polyak.integrations.lightning import EMACallback

    root, val = Path(out), data(2, seed=1)
    res: dict[str, object] = {}

    def run(strategy, epochs, ckpt_dir=None, ckpt_path=None, shard=False):
        cb = EMACallback(0.8, evaluate="both")
        every_epoch = ModelCheckpoint(ckpt_dir, save_top_k=-1, filename="{epoch}", save_last=True)
        callbacks = [cb] if ckpt_dir is None else [cb, every_epoch]
        fit = trainer(
            devices=world,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=callbacks,
            enable_checkpointing=ckpt_dir is not None,
        )
        fit.fit(Regression(shard=shard), data(4), val, ckpt_path=ckpt_path)
        metrics = {k: v.item() for k, v in fit.callback_metrics.items()}
        return cb, metrics

    cb, res["ddp_metrics"] = run("ddp", 2, ckpt_dir=root / "ddp")
    res["ddp"] = {k: v.clone() for k, v in cb.ema.averaged_tensors().items()}
    res["ddp_step"] = cb.ema.step

    def fsdp():
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)

    cb, res["fsdp_metrics"] = run(fsdp(), 2, ckpt_dir=root / "fsdp", shard=True)
    res["fsdp"] = cb.ema.state_dict(full=True)
    cb, _ = run(fsdp(), 2, ckpt_path=root / "fsdp" / "epoch=0.ckpt", shard=True)
    res["fsdp_resumed"] = cb.ema.state_dict(full=True)
    torch.save(res, root / f"rank{rank}.pt")
    _leave()


def _leave() -> None:
    """Leave the process group together, then end the process without interpreter teardown.

    Lightning's FSDP2 run (ModelParallelStrategy) leaves a process group alive after
    ``destroy_process_group()``: DTensor's sharding caches keep its DeviceMesh, which keeps
    the group, its gloo threads and, on rank 0, the TCPStore server thread. They would be torn
    down during interpreter finalization, in no defined order with the C++ destructors and the
    other rank's exit: the worker aborted there now and then ("terminate called without an
    active exception", SIGABRT, 1 run in 4 on a loaded machine). ``gc.collect()`` frees what
    cycles hold (DDP reducers, FSDP states) while the group exists; ``os._exit`` then skips the
    teardown of what is left. The results are already on disk.
    """
    import gc
    import sys

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
