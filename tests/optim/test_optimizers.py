"""Every optimizer a recipe can name runs on CPU and descends; NVLAMB computes what apex's FusedLAMB computes."""

from __future__ import annotations

import typing

import pytest
import torch

from pandallm.optim.nvlamb import NVLamb
from pandallm.optim.optimizers import OptimizerName, build_optimizer, decay_groups

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", typing.get_args(OptimizerName))
def test_each_optimizer_descends_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    # Big enough (>= 4096 elements) for bitsandbytes to keep 8-bit state; a zero tensor, as LoRA's B starts.
    weight = torch.nn.Parameter(torch.randn(64, 96))
    zero = torch.nn.Parameter(torch.zeros(96))
    target = torch.randn(64, 96)
    groups = [{"params": [weight], "weight_decay": 0.01}, {"params": [zero], "weight_decay": 0.0}]
    optimizer = build_optimizer(name, groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, device=CPU)

    def loss() -> torch.Tensor:
        return ((weight - target) ** 2).mean() + ((zero - 1.0) ** 2).mean()

    start = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * start
    assert zero.abs().sum() > 0  # a tensor at zero moves (bitsandbytes' LAMB8bit would leave it there)
    assert optimizer.state_dict()["state"]  # something to checkpoint


def test_nvlamb_step_matches_the_fused_lamb_formula() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(5, 3), torch.randn(3)
    gw, gb = torch.randn(5, 3) * 4, torch.randn(3) * 4  # global norm ~ 16 > max_grad_norm: pre-normalised
    params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    params[0].grad, params[1].grad = gw.clone(), gb.clone()
    lr, (beta1, beta2), eps, decay = 0.1, (0.9, 0.999), 1e-6, 0.01
    NVLamb([{"params": params, "weight_decay": decay}], lr=lr, betas=(beta1, beta2), eps=eps).step()

    norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
    for p, w0, g in zip(params, (w, b), (gw, gb), strict=True):
        g = g / norm  # max_grad_norm 1
        m_hat = (1 - beta1) * g / (1 - beta1)  # first step: bias correction undoes the (1 - beta) factors
        v_hat = (1 - beta2) * g * g / (1 - beta2)
        update = m_hat / (v_hat.sqrt() + eps) + decay * w0
        expected = w0 - lr * (w0.norm() / update.norm()) * update  # trust ratio on every tensor, biases too
        torch.testing.assert_close(p.detach(), expected)


def test_weight_decay_groups_go_by_name_so_flattened_parameters_land_in_the_right_group() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # as FSDP's flat views and ZeRO-3's emptied partitions look to the optimizer
        p.data = p.data.flatten()
    decay, no_decay = decay_groups(model.named_parameters(), 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    norms = {id(p) for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert {id(p) for p in no_decay["params"]} == norms and len(norms) == 5  # 2 per layer and the final norm
    assert len(decay["params"]) == len(list(model.parameters())) - 5

    for name, p in model.named_parameters():  # only matrices trained (LoRA-like): an empty second group, which
        p.requires_grad = "proj" in name  # DeepSpeed would drop (leaving the LR schedule a group too many)
    assert [len(g["params"]) for g in decay_groups(model.named_parameters(), 0.0)] == [14, 0]
    assert [len(g["params"]) for g in decay_groups(model.named_parameters(), 0.0, keep_empty=False)] == [14]


def test_fused_adamw_can_be_turned_off_for_clipping_under_mixed_precision() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 4))
    fused = build_optimizer("adamw", [{"params": [weight]}], 1e-3, (0.9, 0.99), 1e-6, CPU)
    plain = build_optimizer("adamw", [{"params": [weight]}], 1e-3, (0.9, 0.99), 1e-6, CPU, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
