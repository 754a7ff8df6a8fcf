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
