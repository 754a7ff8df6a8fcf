"""FSDP2: sharding the model with `fully_shard`, under Lightning's `ModelParallelStrategy`.

The strategy creates the device mesh and calls `PandaLLM.configure_model`, which builds the model and hands it
here. Each decoder layer becomes one FSDP unit (its weights are gathered for its forward and backward only), and
the root unit holds the rest: embeddings, the final norm and `lm_head`. Unlike Lightning's `FSDPStrategy`, this
runs on CPU too (gloo), so it is tested here (tests/test_parallel.py).

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: 16, tensor_parallel_size: 1}   # = num_nodes x devices, no TP
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy
from transformers import LlamaForCausalLM

from pandallm.errors import ModelError
from pandallm.model.zero import is_zero3


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: `ModelParallelStrategy`'s 2-D mesh must have a tensor-parallel size of 1."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ModelError(
            f"trainer.strategy.init_args.tensor_parallel_size is {mesh['tensor_parallel'].size()}; pandallm applies "
            "FSDP2 only (no tensor parallelism): set tensor_parallel_size: 1 and data_parallel_size to the number "
            "of processes (num_nodes x devices)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def apply_fsdp2(model: LlamaForCausalLM, mesh: DeviceMesh, reshard_after_forward: bool = True) -> LlamaForCausalLM:
    """Shard `model` in place: one FSDP unit per decoder layer, then the root."""
    dp_mesh = data_parallel_mesh(mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again at once by the backward pass: resharding them after forward only costs
    # another all-gather.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    return model


# Units of at least this many parameters; LLaMA-7B's decoder layers have about 200M each.
WRAP_MIN_PARAMETERS = 100_000_000


def wrap_by_size(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """An `auto_wrap_policy` for Lightning's `FSDPStrategy` (FSDP1) that makes FSDP units by size instead of by
    layer class: `auto_wrap_policy: pandallm.model.parallel.wrap_by_size` (configs/fsdp/size_wrap.yaml)."""
    return size_based_auto_wrap_policy(module, recurse, nonwrapped_numel, min_num_params=WRAP_MIN_PARAMETERS)


def fsdp_replicas(trainer: L.Trainer) -> int | None:
    """How many ranks hold each gradient element under Lightning's FSDP on several ranks (1: full or gradient
    sharding; the nodes: hybrid sharding); None where the local gradients give the whole norm (no FSDP, one rank,
    no sharding)."""
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy) or trainer.world_size == 1:
        return None
    mode = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy))
    if mode == "NO_SHARD":
        return None
    if "HYBRID" not in mode:
        return 1
    mesh = strategy.kwargs.get("device_mesh")  # (replicas, shards), or a 2-D DeviceMesh; default: shard per node
    if isinstance(mesh, tuple):
        return mesh[0]
    return mesh.size(0) if mesh is not None else trainer.num_nodes


def fsdp_norm(trainer: L.Trainer, local: torch.Tensor, replicas: int) -> torch.Tensor:
    """The global gradient norm from each rank's norm of its own shard: squares summed over the ranks (on the
    device: with CPU offload the gradients, and so `local`, are in CPU memory), each element counted once."""
    squares = local.to(trainer.strategy.root_device).square()
    return (trainer.strategy.reduce(squares, reduce_op="sum") / replicas).sqrt()


def shards_parameters(strategy: L.pytorch.strategies.Strategy) -> bool:
    """Whether no rank holds the whole model (FSDP, FSDP2, DeepSpeed ZeRO-3)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or is_zero3(strategy)
