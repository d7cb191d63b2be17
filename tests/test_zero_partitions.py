"""The fast tier of the DeepSpeed support (the runs are in tests/test_deepspeed.py, slow): a
ZeRO-3 partition's geometry against a naive reference, states of sharded runs refused by plain
models by name, Accelerate's FullState on an unsharded EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import polyak
from polyak._torch.zero import ZeroShard, _unravel, take_partition
from polyak.integrations.accelerate import FullState


def _partitions(shape, world):
    """ZeroShard of every rank as DeepSpeed lays them out: ceil(numel / world) elements each."""
    numel = int(np.prod(shape))
    size = -(-numel // world)
    return [
        ZeroShard(
            shape, _unravel(r * size, shape), (max(0, min(size, numel - r * size)),), r * size,
            size, None,
        )
        for r in range(world)
    ]  # fmt: skip


@pytest.mark.parametrize("shape", [(31, 13), (5,), (3, 5), (2, 3, 4), (1,)])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_partitions_tile_the_flattened_tensor_once(shape, world):
    full = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    naive = full.numpy().reshape(-1).tolist()
    pieces = []
    for info in _partitions(shape, world):
        part = take_partition(full, info)
        start = info.flat_offset
        assert part.tolist() == naive[start : start + info.partition]  # a Python slice
        if part.numel():
            assert info.offset == tuple(int(i) for i in np.unravel_index(start, shape))
        else:
            assert info.offset == (shape[0],) + (0,) * (len(shape) - 1)
        pieces += part.tolist()
    assert pieces == naive


def test_a_state_of_one_rank_of_a_sharded_run_is_refused_by_an_unsharded_model():
    ema = polyak.EMA(torch.nn.Linear(3, 2), 0.9)
    state = ema.state_dict()
    info = _partitions((2, 3), 2)[0]
    sharded = {**state, "shards": {"weight": info.to_dict()}}
    before = ema.averaged_tensors()["weight"].clone()
    with pytest.raises(ValueError, match=r"one rank's shards of 1 sharded tensors .*full=True"):
        ema.load_state_dict(sharded)
    with pytest.raises(TypeError, match="'shards' must be a mapping"):
        ema.load_state_dict({**state, "shards": [1]})
    assert torch.equal(ema.averaged_tensors()["weight"], before)
    assert all(t.flat_offset is None and not t.sharded for t in ema.layout().values())


def test_full_state_is_the_ema_state_without_sharding():
    model = torch.nn.Linear(3, 2)
    ema = polyak.EMA(model, {"a": 0.9, "b": 0.5})
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    saved = FullState(ema).state_dict()
    other = polyak.EMA(torch.nn.Linear(3, 2), {"a": 0.9, "b": 0.5})
    FullState(other).load_state_dict(saved)
    for name in ("a", "b"):
        for k, v in ema.averaged_tensors(name).items():
            assert torch.equal(other.averaged_tensors(name)[k], v)
    assert other.step == 1
    with pytest.raises(TypeError, match="FullState takes a polyak.EMA, got Linear"):
        FullState(model)
