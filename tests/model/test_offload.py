"""`model.activation_offloading`: ignored with a warning on the CPU; where it applies, the saved activations go
through torch's CPU-offload hooks, with checkpointing, and the step's loss and gradients are unchanged."""

from __future__ import annotations

import logging

import torch

from pandallm.model import offload
from pandallm.model.module import PandaLLM
from tests.conftest import TOKENIZER_DIR
from tests.model.test_chunked_loss import packed_batch, step_of


def module(**options) -> PandaLLM:
    torch.manual_seed(0)
    m = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), gradient_checkpointing=True, **options)
    m.configure_model()
    return m


def test_offloading_is_ignored_with_a_warning_on_the_cpu(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        m = module(activation_offloading=True)
    assert not m._offloads
    assert "activation_offloading has no effect on the CPU" in caplog.text


def test_offloading_without_checkpointing_warns_that_it_copies_every_activation(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert offload.offloads(True, torch.device("cuda"), checkpointing=False)
    assert "copies every saved activation" in caplog.text
    assert not offload.offloads(False, torch.device("cuda"), checkpointing=True)


def test_offloaded_step_packs_the_checkpointed_inputs_and_keeps_loss_and_gradients(monkeypatch) -> None:
    batch = packed_batch()
    expected_loss, expected_grads = step_of(module(), batch)

    packed: list[torch.Size] = []
    save_on_cpu = torch.autograd.graph.save_on_cpu

    class Counting(save_on_cpu):
        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory)
            pack, unpack = self.pack_hook, self.unpack_hook
            self.pack_hook = lambda tensor: packed.append(tensor.shape) or pack(tensor)
            self.unpack_hook = unpack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    m = module()
    m._offloads = True  # what a GPU run decides; on the CPU the hooks copy CPU tensors to the CPU
    loss, grads = step_of(m, batch)
    hidden = m.config.hidden_size
    # Each checkpointed decoder layer's input (batch, seq, hidden) is saved through the hooks.
    assert sum(shape == (*batch["input_ids"].shape, hidden) for shape in packed) >= m.config.num_hidden_layers
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
