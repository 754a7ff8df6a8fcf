"""`model.activation_offloading`: the activations saved for the backward pass kept in CPU memory.

torch's `save_on_cpu` hooks copy every tensor autograd saves to pinned CPU memory during the forward pass and back
to the GPU when backward needs it. Composed with gradient checkpointing (non-reentrant), the tensors saved are each
decoder layer's input (torch's checkpoint saves them through autograd, so the hooks see them) and what runs outside
the checkpointed layers; the activations inside a layer are recomputed on the GPU in backward, one layer at a time.
GPU memory for activations then no longer grows with the number of layers, at the cost of a host copy of each
layer's input each way. (torchtune's `OffloadActivations` overlaps those copies with compute on a second CUDA
stream; torch's hooks copy synchronously, which is slower, and cannot be measured here without a GPU.)
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def offloads(enabled: bool, device: torch.device, checkpointing: bool) -> bool:
    """Whether to offload on `device`: never where activations already live in CPU memory."""
    if not enabled:
        return False
    if device.type == "cpu":
        log.warning("pandallm: model.activation_offloading has no effect on the CPU (activations are in CPU memory)")
        return False
    if not checkpointing:
        log.warning(
            "pandallm: model.activation_offloading without model.gradient_checkpointing copies every saved "
            "activation to the host and back each step; with checkpointing only each layer's input is copied"
        )
    return True


def offload_activations(active: bool) -> contextlib.AbstractContextManager:
    """Around a forward pass: the tensors autograd saves go to pinned CPU memory when `active`."""
    if not active:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
