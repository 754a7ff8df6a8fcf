"""PPO's pieces against direct implementations of their formulas (GAE, whitening, the clipped losses, the per-token
rewards), its whole loss on a fixed rollout against plain transformers, and the repetition of the rows that several
optimizer steps per rollout need."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.data.encode import IGNORE_INDEX
from pandallm.data.sampling import EpochSampler, Repeat, TrainingOrder
from pandallm.errors import ConfigError, ModelError
from pandallm.model.module import PandaLLM
from pandallm.model.presets import llama_tiny
from pandallm.objectives import PPO
from pandallm.objectives.ppo import adapted_kl_coef, token_losses, token_rewards
from pandallm.rl.advantages import gae, whiten
from pandallm.rl.buffer import RolloutBuffer, position
from pandallm.rl.rollout import Rollout
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR

REWARD = [{"function": "pandallm.rewards:ends_with"}]


def actions(mask: torch.Tensor, row: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[row, t]]


def direct_gae(rewards, values, mask, gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """GAE written out action by action (Schulman et al. 2016, eq. 16 as a recursion), in Python floats: each row's
    actions, last to first, the value after the last one 0."""
    advantages, returns = [], []
    for i in range(len(rewards)):
        steps = actions(mask, i)
        row_advantages = [0.0] * len(steps)
        following, next_value = 0.0, 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            following = delta + gamma * lam * following
            row_advantages[k] = following
            next_value = float(values[i, t])
        advantages.append(row_advantages)
        returns.append([a + float(values[i, t]) for a, t in zip(row_advantages, steps, strict=True)])
    return advantages, returns


def completion_mask(generator: torch.Generator, rows: int = 5, width: int = 9) -> torch.Tensor:
    """Each row's actions contiguous, after a prompt of its own length, of a length of their own."""
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i in range(rows):
        start = int(torch.randint(0, 4, (1,), generator=generator))
        length = int(torch.randint(1, width - start, (1,), generator=generator))
        mask[i, start : start + length] = True
    return mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_equals_the_recursion_written_out(gamma: float, lam: float) -> None:
    generator = torch.Generator().manual_seed(0)
    mask = completion_mask(generator)
    rewards = torch.randn(mask.shape, generator=generator, dtype=torch.float64) * mask
    values = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = direct_gae(rewards, values, mask, gamma, lam)
    for i in range(len(mask)):
        steps = actions(mask, i)
        assert advantages[i, steps].tolist() == pytest.approx(expected_advantages[i], abs=1e-12)
        assert returns[i, steps].tolist() == pytest.approx(expected_returns[i], abs=1e-12)
        assert not advantages[i, ~mask[i]].any() and not returns[i, ~mask[i]].any()


def test_whitening_uses_the_actions_only() -> None:
    generator = torch.Generator().manual_seed(1)
    mask = completion_mask(generator)
    values = torch.randn(mask.shape, generator=generator, dtype=torch.float64) * 3 + 2
    chosen = values[mask].tolist()
    mean, std = statistics.fmean(chosen), statistics.stdev(chosen)
    whitened = whiten(values, mask)
    assert whitened[mask].tolist() == pytest.approx([(v - mean) / math.sqrt(std**2 + 1e-8) for v in chosen], abs=1e-12)
    assert not whitened[~mask].any()
    one = torch.zeros_like(mask)
    one[0, 2] = True
    assert whiten(values, one)[0, 2] == 0  # a single action: centred, not divided by a zero deviation


def test_clipped_losses_equal_the_formulas_in_fp64() -> None:
    generator = torch.Generator().manual_seed(2)
    shape = (6, 7)
    logps = -torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)  # some ratios get clipped
    advantages = torch.randn(shape, generator=generator, dtype=torch.float64)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    old_values = values + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64)
    returns = torch.randn(shape, generator=generator, dtype=torch.float64)
    policy, value, clipped, value_clipped = token_losses(logps, old, advantages, values, old_values, returns, 0.2, 0.2)
    for i in range(shape[0]):
        for t in range(shape[1]):
            ratio, a = math.exp(float(logps[i, t] - old[i, t])), float(advantages[i, t])
            expected = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            assert float(policy[i, t]) == pytest.approx(expected, abs=1e-12)
            v, v_old, r = float(values[i, t]), float(old_values[i, t]), float(returns[i, t])
            v_clip = v_old + min(max(v - v_old, -0.2), 0.2)
            assert float(value[i, t]) == pytest.approx(0.5 * max((v - r) ** 2, (v_clip - r) ** 2), abs=1e-12)
    assert 0 < int(clipped.sum()) < clipped.numel() and 0 < int(value_clipped.sum()) < value_clipped.numel()


def test_the_score_comes_at_the_last_action_and_the_kl_penalty_at_each() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    kl = torch.full((2, 5), 0.5)
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert rewards.flatten().tolist() == pytest.approx([0, -0.05, -0.05, 1.95, 0, 0, 0, -1.05, 0, 0])


@pytest.mark.parametrize("loss_impl", ["full", "chunked"])
def test_the_loss_of_a_rollout_equals_a_direct_computation_in_plain_transformers(
    tmp_path: Path, loss_impl: str
) -> None:
    # The policy's log-probabilities at the sampling temperature and the value head on the last (normed) hidden
    # states, from transformers' own forward; then the KL penalty, GAE, whitening and the clipped losses as written
    # in the tests above. The first pass: the old policy and values are the current ones.
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    objective = PPO(REWARD, kl_coef=0.1, temperature=0.7, lam=0.9, vf_coef=0.3)
    module = PandaLLM(str(tmp_path / "init"), objective=objective, loss_impl=loss_impl)
    module.configure_model()
    assert module.loss_path == loss_impl
    module.model.eval()  # no dropout: the direct computation below must see the same forward
    with torch.no_grad():
        module.heads["value"].weight.normal_(0, 0.1)  # a value head that predicts something
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(tokenizer), (3, 8), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (start, end) in enumerate([(3, 8), (2, 5), (4, 6)]):
        labels[i, start:end] = ids[i, start:end]
    rollout = Rollout(
        ids, torch.arange(8).expand(3, 8), labels, torch.ones_like(ids), [""] * 3, torch.ones(3), ids[:, 0] < 0
    )
    scores = torch.tensor([1.0, 0.0, 0.5])
    entry = objective.rollout_entry(rollout, {}, scores=scores)
    ref_logps = -torch.rand(3, 8, generator=generator)
    entry["ref_logps"] = ref_logps
    terms = objective.trained(module, entry)

    with torch.no_grad():
        out = LlamaForCausalLM.from_pretrained(tmp_path / "init")(input_ids=ids, output_hidden_states=True)
        logps = torch.log_softmax(out.logits.double() / 0.7, dim=-1)
        head = module.heads["value"]
        values = (out.hidden_states[-1].double() @ head.weight.double().T + head.bias.double()).squeeze(-1)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    token_logps = torch.zeros(3, 8, dtype=torch.float64)
    token_logps[:, :-1] = logps[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = (token_logps - ref_logps.double()) * mask
    rewards = -0.1 * kl
    for i in range(3):
        rewards[i, actions(mask, i)[-1]] += float(scores[i])
    advantages, returns = direct_gae(rewards, values, mask, 1.0, 0.9)
    flat = [a for row in advantages for a in row]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    # On-policy the ratio is 1 and the values are the old ones: the policy loss is -A, the value loss 0.5 (V - R)^2.
    expected = 0.0
    for i in range(3):
        for k, t in enumerate(actions(mask, i)):
            expected += -(advantages[i][k] - mean) / std + 0.3 * 0.5 * (float(values[i, t]) - returns[i][k]) ** 2
    assert int(terms.count) == int(mask.sum())
    assert float(terms.loss_sum) == pytest.approx(expected, abs=1e-4)
    assert float(terms.metrics["kl"]) == pytest.approx(float(kl.sum()), abs=1e-4)
    assert float(terms.metrics["value"]) == pytest.approx(float((values * mask).sum()), abs=1e-4)
    assert float(terms.metrics["clip_ratio"]) == 0  # on-policy: nothing to clip
    entropies = -(logps.exp() * logps).sum(-1)[:, :-1][mask[:, :-1]]
    assert float(terms.metrics["entropy"]) == pytest.approx(float(entropies.sum()), rel=1e-5)
    terms.loss_sum.backward()
    assert module.heads["value"].weight.grad.abs().sum() > 0  # the value head trains


def test_rows_repeat_window_by_window_and_resume_inside_a_repetition() -> None:
    order = TrainingOrder(sizes=(10,), shuffle=False)
    repeat = Repeat(window=4, times=2)
    # Rank 1 of 2 reads rows 1, 3, 5, 7, 9, padded by wrapping around to two whole windows, each read twice.
    sampler = EpochSampler(order, rank=1, world_size=2, repeat=repeat)
    assert list(sampler) == [1, 3, 5, 7, 1, 3, 5, 7, 9, 1, 3, 5, 9, 1, 3, 5]
    assert len(sampler) == 16
    # Resumed after 6 rows of every rank (12 of all ranks): the second window's second half of its first reading.
    resumed = EpochSampler(order, rank=1, world_size=2, rows_read=12, repeat=repeat)
    assert list(resumed) == [5, 7, 9, 1, 3, 5, 9, 1, 3, 5]
    assert Repeat(window=3, times=1).apply(np.arange(5)).tolist() == [0, 1, 2, 3, 4, 0]


def test_a_micro_batch_is_placed_in_its_rollout_by_its_position_in_the_epoch() -> None:
    # 2 micro-batches per step, 3 steps per rollout: batches 0-5 are the first rollout (its passes 0, 0, 1, 1, 2, 2),
    # batch 6 starts the next one; a new epoch (batch 0 again) starts a rollout, whatever global step it is.
    def at(batch: int) -> tuple[int, int]:
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch)))
        trainer.accumulate_grad_batches = 2
        return position(trainer, passes=3)

    assert [at(b) for b in range(8)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 0), (0, 1)]


def test_a_batch_that_is_not_the_kept_rollouts_is_refused() -> None:
    buffer = RolloutBuffer()
    buffer.put(0, torch.tensor([1, 2]), {"x": torch.zeros(1)})
    assert buffer.get(0, torch.tensor([1, 2]), step=5)["x"].tolist() == [0.0]
    with pytest.raises(ModelError, match="step 5: this batch's prompts are not those of the rollout"):
        buffer.get(0, torch.tensor([1, 3]), step=5)
    # A checkpoint's rollout of another number of ranks is not taken back; said only when a step needs it.
    buffer.load_state_dict({})
    buffer.lost = "saved in the middle of a rollout by 2 ranks"
    with pytest.raises(ConfigError, match="by 2 ranks"):
        buffer.get(0, torch.tensor([1, 2]), step=5)
    buffer.put(0, torch.tensor([4]), {})  # a new rollout: nothing is missing any more
    assert buffer.lost is None


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("ppo_epochs", 0, "ppo_epochs must be >= 1, got 0"),
        ("lam", 1.5, r"lam must be in \[0, 1\], got 1.5"),
        ("kl_coef", -0.1, "kl_coef must be >= 0"),
        ("temperature", 0.0, "model.objective.init_args.temperature"),
    ],
)
def test_bad_options_are_refused_naming_them(option: str, value: float, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        PPO(REWARD, **{option: value})


def test_the_adaptive_kl_weight_moves_toward_its_target_by_at_most_a_fifth_per_horizon() -> None:
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2), weight *= 1 + e * n / horizon.
    assert adapted_kl_coef(0.2, kl=9.0, completions=100, target=6.0, horizon=1000) == pytest.approx(0.2 * 1.02)
    assert adapted_kl_coef(0.2, kl=3.0, completions=100, target=6.0, horizon=1000) == pytest.approx(0.2 * 0.98)
    assert adapted_kl_coef(0.2, kl=6.6, completions=100, target=6.0, horizon=1000) == pytest.approx(0.2 * 1.01)
    with pytest.raises(ConfigError, match="kl_coef must be > 0 with kl_target"):
        PPO(REWARD, kl_coef=0.0, kl_target=6.0)
    # A checkpoint's adapted weight continues the adaptation it came from, not another configuration's.
    module = SimpleNamespace(rollouts=RolloutBuffer())
    module.rollouts.kl_coef = [0.1, 0.08]
    assert PPO(REWARD, kl_coef=0.1, kl_target=6.0).kl_coefficient(module) == 0.08
    assert PPO(REWARD, kl_coef=0.3, kl_target=6.0).kl_coefficient(module) == 0.3
    assert PPO(REWARD, kl_coef=0.1).kl_coefficient(module) == 0.1


def test_ppo_epochs_are_the_optimizer_steps_per_rollout() -> None:
    assert PPO(REWARD, ppo_epochs=3).passes == 3
