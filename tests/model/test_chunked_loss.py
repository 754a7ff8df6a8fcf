"""`model.loss_impl`: the chunked loss gives the full path's loss and gradients (SFT, packing, masking, LoRA, tied
embeddings, preference objectives), and falls back to the full path where it cannot run."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from pandallm.data.collate import collate_rows
from pandallm.data.encode import pack_documents
from pandallm.errors import ConfigError
from pandallm.model.chunked_loss import chunk_tokens_for, chunked_loss_sum, chunked_token_logps
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.model.module import PandaLLM
from pandallm.objectives import DPO, SFT
from pandallm.objectives.logps import sequence_logps
from tests.conftest import TOKENIZER_DIR


def random_case(dtype=torch.float64):
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 8, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 8, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = -100  # a masked prompt
    labels[2, 10:] = -100  # padding
    return hidden, weight, labels


def gradients(hidden, weight, loss: torch.Tensor) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, [hidden, weight])]


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_chunked_loss_and_gradients_are_the_full_ones(chunk: int | None) -> None:
    hidden, weight, labels = random_case()
    full_sum, full_count = causal_lm_loss_sum(hidden @ weight.T, labels)
    chunked_sum, chunked_count = chunked_loss_sum(hidden, weight, labels, chunk)
    assert chunked_count == full_count == 37
    # Scaled as the token-weighted accumulation scales it: backward brings a scalar other than 1.
    expected = gradients(hidden, weight, 1.7 * full_sum)
    for a, b in zip(expected, gradients(hidden, weight, 1.7 * chunked_sum), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_chunked_token_logps_give_the_sequence_logps_and_their_gradients(chunk: int | None) -> None:
    hidden, weight, labels = random_case()
    upstream = torch.randn(3, dtype=torch.float64)  # each row's own gradient, as a preference loss gives it
    full, counts = sequence_logps(hidden @ weight.T, labels)
    chunked = chunked_token_logps(hidden, weight, labels, chunk)
    assert chunked[labels.roll(-1, 1) == -100].abs().sum() == 0  # positions whose next token is not trained
    expected = gradients(hidden, weight, (full * upstream).sum())
    for a, b in zip(expected, gradients(hidden, weight, (chunked.sum(-1) * upstream).sum()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_evaluation_under_no_grad_builds_no_gradients() -> None:
    hidden, weight, labels = random_case()
    with torch.no_grad():
        loss, _ = chunked_loss_sum(hidden, weight, labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, causal_lm_loss_sum(hidden.detach() @ weight.detach().T, labels)[0])


def test_chunk_size_keeps_a_chunks_logits_within_128_mib() -> None:
    assert chunk_tokens_for(128_256) == 256
    assert chunk_tokens_for(32_000) == 1024
    assert chunk_tokens_for(3_000) == 8192
    assert chunk_tokens_for(128_256, 64) == 64


def packed_batch() -> dict[str, torch.Tensor]:
    """A pack of two documents (position_ids restart), then a short padded row; prompts masked."""
    documents = [[1, 5, 6, 7, 8, 2], [1, 9, 10, 11, 2]]
    [pack] = list(pack_documents(documents, max_seq_length=16))
    short = next(iter(pack_documents([[1, 20, 21, 22, 2]], max_seq_length=16)))
    batch = collate_rows([pack.__dict__, short.__dict__], pad_id=0)
    batch["labels"][0, :2] = -100
    batch["labels"][1, :3] = -100
    return batch


def module(loss_impl: str, objective=None, **options) -> PandaLLM:
    torch.manual_seed(0)
    m = PandaLLM(
        model_name_or_path="llama-tiny",
        tokenizer=str(TOKENIZER_DIR),
        loss_impl=loss_impl,
        objective=objective or SFT(),
        lora_dropout=0.0,
        **options,
    )
    m.configure_model()
    return m


def step_of(m: PandaLLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    terms = m.objective.terms(m, batch, "train")
    loss = terms.loss_sum / terms.count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"config_overrides": {"tie_word_embeddings": True}},
        {"use_lora": True, "lora_r": 4},  # lm_head frozen
        {"use_lora": True, "lora_r": 4, "modules_to_save": ["lm_head"]},
    ],
    ids=["full-model", "tied-embeddings", "lora", "lora-trains-lm-head"],
)
def test_sft_step_is_the_full_paths(options: dict) -> None:
    batch = packed_batch()
    full = module("full", **options)
    chunked = module("chunked", **options)
    assert (full.loss_path, chunked.loss_path) == ("full", "chunked")
    full_loss, full_grads = step_of(full, batch)
    chunked_loss, chunked_grads = step_of(chunked, batch)
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == full_grads.keys()
    if "modules_to_save" in options:
        assert any("lm_head" in name for name in chunked_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_dpo_step_is_the_full_paths() -> None:
    from tests.objectives.test_losses import REFERENCE, batch

    results = []
    for impl in ("full", "chunked"):
        m = module(impl, objective=DPO(beta=0.5))
        m.reference_logps = lambda batch, stage: REFERENCE.float()
        results.append(step_of(m, batch()))
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_on_lm_head_falls_back_to_the_full_logits(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        m = module("chunked", use_lora=True, lora_r=4, lora_target_modules=["q_proj", "lm_head"])
    assert m.loss_path == "full"
    assert "lm_head carries LoRA adapters" in caplog.text


def test_auto_is_chunked_on_the_cpu_and_liger_is_refused_there() -> None:
    assert module("auto").loss_path == "chunked"
    with pytest.raises(ConfigError, match="liger cannot run: Liger's kernels are Triton GPU kernels"):
        module("liger")
    with pytest.raises(ConfigError, match="model.liger_kernels: Liger's kernels are Triton GPU kernels"):
        module("auto", liger_kernels=True)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger's kernels need a CUDA GPU and liger-kernel",
)
def test_liger_loss_and_kernels_give_the_full_paths_step_on_the_gpu() -> None:
    batch = {k: v.cuda() for k, v in packed_batch().items()}
    results = []
    for options in ({"loss_impl": "full"}, {"loss_impl": "liger"}, {"loss_impl": "liger", "liger_kernels": True}):
        torch.manual_seed(0)
        m = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), **options)
        m._device_of_run = lambda: torch.device("cuda")
        m.configure_model()
        m.cuda()
        results.append(step_of(m, batch))
    (full_loss, full_grads), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
        for name, grad in full_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
