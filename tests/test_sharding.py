"""``shard_module``'s argument checks (the sharding itself needs a device mesh: tests/callbacks/test_sharded_*)."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_stability.sharding import shard_module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.head = nn.Linear(2, 1)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda net: shard_module("net", []), TypeError, "`pl_module` must be the LightningModule to shard, got str"),
        (lambda net: shard_module(net, 3), TypeError, "`units` must be an iterable of modules, got 3"),
        (lambda net: shard_module(net, net.head), TypeError, "`units` must be an iterable of modules, got Linear"),
        (lambda net: shard_module(net, [net.head, "b"]), TypeError, "`units` must contain `torch.nn.Module`s, got str"),
        (lambda net: shard_module(net, [], replicate=[1]), TypeError, "`replicate` must contain .* got int: 1"),
        (lambda net: shard_module(net, [], mesh="m"), ValueError, "`shard_module` sets `mesh` itself; got `mesh='m'`"),
        (lambda net: shard_module(net, [], ignored_params=set()), ValueError, "sets `ignored_params` itself"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(Net())


def test_without_a_device_mesh_it_is_a_no_op():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert shard_module(net, net.blocks, replicate=[net.head]) is False
    assert shard_module(net, (b for b in net.blocks)) is False  # a generator of units is accepted too
    assert all(type(m) is nn.Linear for m in (*net.blocks, net.head))  # nothing was wrapped
    assert all(v.equal(before[k]) for k, v in net.state_dict().items())
