"""FSDP2 sharding choices that need no process group; tests/test_parallel.py trains with them on 2 processes."""

from __future__ import annotations

import pytest
import torch

from pandallm.errors import ModelError
from pandallm.model.parallel import data_parallel_mesh, wrap_by_size


class FakeMesh:
    """The parts of `ModelParallelStrategy`'s 2-D DeviceMesh that `data_parallel_mesh` reads."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, data: int, tensor: int) -> None:
        self.sizes = {"data_parallel": data, "tensor_parallel": tensor}

    def __getitem__(self, name: str):
        size = self.sizes[name]
        return type("Dim", (), {"size": lambda self: size, "name": name})()


def test_fsdp2_shards_over_the_data_parallel_dimension_and_refuses_tensor_parallelism() -> None:
    assert data_parallel_mesh(FakeMesh(4, 1)).name == "data_parallel"
    with pytest.raises(ModelError, match="tensor_parallel_size is 2; .* set tensor_parallel_size: 1"):
        data_parallel_mesh(FakeMesh(2, 2))


def test_size_policy_wraps_modules_of_100m_parameters_or_more() -> None:
    module = torch.nn.Linear(2, 2)
    assert wrap_by_size(module, recurse=False, nonwrapped_numel=200_000_000)
    assert not wrap_by_size(module, recurse=False, nonwrapped_numel=1_000_000)
    assert wrap_by_size(module, recurse=True, nonwrapped_numel=200_000_000)  # looks inside large modules only
    assert not wrap_by_size(module, recurse=True, nonwrapped_numel=1_000_000)


@pytest.mark.parametrize(
    ("mode", "extra", "replicas"),
    [
        ("FULL_SHARD", {}, 1),
        ("SHARD_GRAD_OP", {}, 1),
        ("NO_SHARD", {}, None),  # every rank holds every gradient: its own norm is the global one
        ("HYBRID_SHARD", {"auto_wrap_policy": {torch.nn.Linear}}, 2),  # sharded in a node, replicated over 2 nodes
        ("HYBRID_SHARD", {"device_mesh": (4, 2)}, 4),
    ],
)
def test_fsdp_gradient_norm_counts_each_gradient_element_once(
    mode: str, extra: dict, replicas: int | None, monkeypatch
) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from pandallm.model.parallel import fsdp_norm, fsdp_replicas

    strategy = FSDPStrategy(sharding_strategy=mode, **extra)
    trainer = SimpleNamespace(strategy=strategy, world_size=8, num_nodes=2)
    assert fsdp_replicas(trainer) == replicas
    if replicas is None:
        return
    # 8 ranks, each with a local shard norm of 1 (squares 1): the reduce sums 8, each element counted `replicas` times.
    strategy.reduce = lambda tensor, reduce_op: tensor * 8
    monkeypatch.setattr(FSDPStrategy, "root_device", property(lambda self: torch.device("cpu")))
    assert fsdp_norm(trainer, torch.tensor(1.0), replicas).item() == pytest.approx((8 / replicas) ** 0.5)
