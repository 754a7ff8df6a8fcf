"""GRPO's loss and advantages: equal to a direct fp64 implementation of the formulas, and to TRL's GRPOTrainer on the
same batch of completions (same model, same reference, same advantages)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.data.encode import IGNORE_INDEX
from pandallm.model.module import PandaLLM
from pandallm.model.presets import llama_tiny
from pandallm.objectives import GRPO
from pandallm.objectives.grpo import group_advantages, loss_sum, token_losses
from pandallm.rl.rollout import Rollout, completion_rows
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR

REWARD = [{"function": "pandallm.rewards:ends_with"}]


def direct_loss(logps, old, ref, advantages, mask, epsilon, beta, loss_type, max_new_tokens) -> float:
    """The GRPO objective written out completion by completion and token by token (Shao et al. 2024, eq. 3; Dr. GRPO;
    DAPO's token-level sum), in Python floats."""
    total, tokens, completions = 0.0, 0, len(logps)
    for i in range(completions):
        row = 0.0
        n = int(mask[i].sum())
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = float(torch.exp(logps[i, t] - old[i, t]))
            a = float(advantages[i])
            surrogate = min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon) * a)
            kl = float(torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1)
            row += -surrogate + beta * kl
        total += row / n if loss_type == "grpo" else row / max_new_tokens if loss_type == "dr_grpo" else row
        tokens += n
    return total / (tokens if loss_type == "dapo" else completions)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_equals_the_formula_in_fp64(loss_type: str) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (6, 7)
    logps = -torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)  # some ratios get clipped
    ref = logps + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = torch.rand(shape, generator=generator) > 0.3
    mask[:, 0] = True
    advantages = torch.randn(6, generator=generator, dtype=torch.float64)
    losses, _, clipped = token_losses(logps, old, advantages, 0.2, 0.04, ref)
    total, units = loss_sum(losses, mask, loss_type, 7)
    expected = direct_loss(logps, old, ref, advantages, mask, 0.2, 0.04, loss_type, 7)
    assert abs(float(total / units) - expected) < 1e-12
    assert 0 < int((clipped & mask).sum()) < int(mask.sum())  # the clipped branch is exercised


def test_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 5.0, 5.0, 5.0, 0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    scaled, centred = group_advantages(rewards, 4, scale=True), group_advantages(rewards, 4, scale=False)
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean = sum(group) / 4
        std = (sum((r - mean) ** 2 for r in group) / 3) ** 0.5  # Bessel-corrected, as TRL's
        for i, r in enumerate(group):
            assert abs(float(centred[4 * g + i]) - (r - mean)) < 1e-12
            assert abs(float(scaled[4 * g + i]) - (r - mean) / (std + 1e-4)) < 1e-9
    assert torch.equal(scaled[4:8], torch.zeros(4, dtype=torch.float64))  # equal rewards teach nothing


def test_completion_rows_cut_each_completion_after_its_first_eos_and_drop_the_prompt_padding() -> None:
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    eos, pad = tokenizer.eos_token_id, 0
    prompts = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    mask = (prompts != pad).long()
    new = torch.tensor([[10, eos, 11], [12, 13, 14], [eos, 15, 16], [17, 18, eos]])
    rollout = completion_rows(prompts, mask, new, 2, eos, pad, tokenizer)
    assert rollout.lengths.tolist() == [2, 3, 1, 3] and rollout.truncated.tolist() == [False, True, False, False]
    assert rollout.input_ids[0, :4].tolist() == [5, 6, 10, eos] and rollout.input_ids[0, 4:].eq(pad).all()
    assert rollout.labels[0].tolist()[:4] == [IGNORE_INDEX, IGNORE_INDEX, 10, eos]
    assert rollout.input_ids[3].tolist() == [7, 8, 9, 17, 18, eos]


# ---- TRL ------------------------------------------------------------------------------------------------------------


def trl_batch(tokenizer, generator) -> tuple[dict, Rollout]:
    """4 completions of 2 prompts of the same length (no left padding), with their masks, and our rows of them."""
    prompts = torch.randint(10, 2000, (4, 5), generator=generator)
    prompts[1], prompts[3] = prompts[0], prompts[2]
    completions = torch.randint(10, 2000, (4, 6), generator=generator)
    lengths = torch.tensor([6, 3, 5, 1])
    completion_mask = (torch.arange(6) < lengths[:, None]).long()
    rows = torch.cat([prompts, completions], dim=1)
    labels = torch.where(torch.cat([torch.zeros_like(prompts), completion_mask], dim=1).bool(), rows, IGNORE_INDEX)
    rollout = Rollout(
        input_ids=rows,
        position_ids=torch.arange(11).expand(4, 11).contiguous(),
        labels=labels,
        attention_mask=torch.ones_like(rows),
        completions=[""] * 4,
        lengths=lengths,
        truncated=lengths == 6,
    )
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }
    return inputs, rollout


@pytest.mark.parametrize(
    ("loss_type", "loss_impl"), [("grpo", "full"), ("grpo", "chunked"), ("dr_grpo", "chunked"), ("dapo", "full")]
)
def test_loss_and_gradients_equal_trls_grpo_trainer(tmp_path: Path, loss_type: str, loss_impl: str) -> None:
    # Both ways of scoring the policy (`model.loss_impl`): its full logits, or chunks of them.
    trl = pytest.importorskip("trl", reason="TRL is the reference implementation")
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    beta, temperature, max_new_tokens = 0.1, 0.7, 6
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=max_new_tokens,
        beta=beta,
        loss_type=loss_type,
        temperature=temperature,
        # The paper's KL gradient (TRL 1.x multiplies the KL term by the ratio by default, DeepSeek-V3.2's correction:
        # the same loss value on-policy, another gradient).
        use_bias_correction_kl=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.GRPOTrainer(
        model=str(tmp_path / "init"),
        reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        args=config,
        train_dataset=__import__("datasets").Dataset.from_dict({"prompt": ["a"] * 4}),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which is not run here
    objective = GRPO(REWARD, num_generations=2, loss_type=loss_type, beta=beta, temperature=temperature)
    objective.max_new_tokens = max_new_tokens
    module = PandaLLM(str(tmp_path / "init"), objective=objective, loss_impl=loss_impl)
    module.configure_model()
    assert module.loss_path == loss_impl
    # A reference that differs from the policy: the starting model with its weights moved, the same on both sides.
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(module.model).eval().requires_grad_(False)
    reference.load_state_dict(trainer.ref_model.state_dict())
    module.reference_scores.model = reference

    inputs, rollout = trl_batch(tokenizer, torch.Generator().manual_seed(1))
    advantages = torch.tensor([0.7, -0.7, 1.2, -1.2])
    entry = objective.rollout_entry(rollout, {}, advantages=advantages)
    entry["ref_logps"] = module.reference_scores.token_scores(module, entry, temperature)
    ours = objective.trained(module, entry)
    (ours.loss_sum / ours.count).backward()

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, 6)
    theirs = trainer._compute_loss(
        trainer.model, {**inputs, "advantages": advantages, "ref_per_token_logps": ref_logps}
    )
    theirs.backward()
    torch.testing.assert_close((ours.loss_sum / ours.count).double(), theirs.double(), rtol=0, atol=1e-5)
    # Each gradient tensor within 1e-3 of its largest element: TRL's fused log-probability head is the less precise
    # side (see test_trl_parity; pandallm's gradients here are 1e-6 from an fp64 computation of the same loss).
    named = dict(trainer.model.named_parameters())
    for name, p in module.model.named_parameters():
        theirs_grad = named[name].grad
        assert (p.grad - theirs_grad).abs().max() <= 1e-3 * theirs_grad.abs().max(), name
    # The KL term is there: the reference is not the policy.
    assert float(ours.metrics["kl"]) > 0
