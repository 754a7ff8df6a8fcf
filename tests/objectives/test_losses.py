"""Every option of the preference objectives reaches the loss: each loss equals the formula of its paper, computed here
on its own (per-token log-probabilities gathered from the logits, in fp64), and DPO's gradient is the fp64 one."""

from __future__ import annotations

import math

import pytest
import torch

from pandallm.data.pairs import collate_pairs
from pandallm.errors import ConfigError
from pandallm.model.module import PandaLLM
from pandallm.objectives import DPO, KTO, ORPO, SimPO
from tests.conftest import TOKENIZER_DIR

# Two pairs: [BOS] prompt, then a completion (trained) of a few tokens.
PAIRS = [
    {"prompt": [1, 50, 51, 52], "chosen": [60, 61, 2], "rejected": [70, 71, 72, 73, 2]},
    {"prompt": [1, 80, 81], "chosen": [90, 2], "rejected": [95, 96, 2]},
]


def batch() -> dict[str, torch.Tensor]:
    rows = [
        {
            f"{side}_input_ids": p["prompt"] + p[side],
            f"{side}_labels": [-100] * len(p["prompt"]) + p[side],
        }
        for p in PAIRS
        for side in ("chosen", "rejected")
    ]
    merged = [{**rows[2 * i], **rows[2 * i + 1], "index": i} for i in range(len(PAIRS))]
    return collate_pairs(merged, pad_id=0)


def module(objective) -> PandaLLM:
    torch.manual_seed(0)
    m = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), objective=objective)
    m.configure_model()
    m.model.double()
    return m


def completion_logps(m: PandaLLM, reference_shift: float = 0.0) -> tuple[list[float], list[int]]:
    """Per sequence (chosen 0, chosen 1, rejected 0, rejected 1): the summed log-probability of its completion and its
    length, gathered token by token from the model's own logits."""
    b = batch()
    logits = m.model(input_ids=b["input_ids"]).logits.double()
    sums, lengths = [], []
    for row in range(b["input_ids"].shape[0]):
        positions = (b["labels"][row] != -100).nonzero().flatten().tolist()
        token_logps = [logits[row, t - 1].log_softmax(-1)[b["labels"][row, t]] for t in positions]
        sums.append(float(sum(token_logps)) + reference_shift)
        lengths.append(len(positions))
    return sums, lengths


def loss_of(objective, reference: torch.Tensor | None = None) -> float:
    m = module(objective)
    b = batch()
    if reference is not None:
        m.reference_logps = lambda batch, stage: reference.to(torch.float64)
    terms = objective.terms(m, b, "train")
    return (terms.loss_sum / terms.count).item()


REFERENCE = torch.tensor([-30.0, -12.0, -41.0, -20.0], dtype=torch.float64)  # chosen 0, chosen 1, rejected 0, 1


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_losses_are_their_formulas(loss_type: str, label_smoothing: float) -> None:
    beta = 0.3
    policy, lengths = completion_logps(module(DPO()))
    ratios = [p - r for p, r in zip(policy, REFERENCE.tolist(), strict=True)]
    expected = []
    for i in range(2):
        chosen, rejected = ratios[i], ratios[2 + i]
        if loss_type == "sigmoid":  # cDPO: a share eps of the labels flipped
            z = beta * (chosen - rejected)
            eps = label_smoothing
            expected.append(-(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z))))
        elif loss_type == "ipo":  # each log-ratio averaged over its tokens, then (h - 1 / (2 beta))^2
            h = chosen / lengths[i] - rejected / lengths[2 + i]
            expected.append((h - 1 / (2 * beta)) ** 2)
        else:
            expected.append(max(0.0, 1 - beta * (chosen - rejected)))
    objective = DPO(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert loss_of(objective, REFERENCE) == pytest.approx(sum(expected) / 2, rel=1e-9)


def test_simpo_and_orpo_are_their_formulas() -> None:
    policy, lengths = completion_logps(module(SimPO()))
    average = [p / n for p, n in zip(policy, lengths, strict=True)]
    beta, gamma = 2.5, 0.7
    simpo = [-math.log(1 / (1 + math.exp(-(beta * average[i] - beta * average[2 + i] - gamma)))) for i in range(2)]
    assert loss_of(SimPO(beta=beta, gamma=gamma)) == pytest.approx(sum(simpo) / 2, rel=1e-9)

    def odds(logp: float) -> float:  # log(p / (1 - p)) of the average token probability p = exp(logp)
        return logp - math.log(1 - math.exp(logp))

    lam = 0.4
    orpo = [
        -average[i] - lam * math.log(1 / (1 + math.exp(-(odds(average[i]) - odds(average[2 + i]))))) for i in range(2)
    ]
    assert loss_of(ORPO(beta=lam)) == pytest.approx(sum(orpo) / 2, rel=1e-9)


def test_dpo_rewards_are_beta_times_the_log_ratios() -> None:
    m = module(DPO(beta=0.5))
    m.reference_logps = lambda batch, stage: REFERENCE
    terms = m.objective.terms(m, batch(), "train")
    policy, _ = completion_logps(m)
    ratios = [p - r for p, r in zip(policy, REFERENCE.tolist(), strict=True)]
    assert terms.metrics["rewards/chosen"].item() == pytest.approx(0.5 * (ratios[0] + ratios[1]), rel=1e-9)
    assert terms.metrics["rewards/rejected"].item() == pytest.approx(0.5 * (ratios[2] + ratios[3]), rel=1e-9)
    accuracies = sum(ratios[i] > ratios[2 + i] for i in range(2))
    assert terms.metrics["rewards/accuracies"].item() == accuracies


def test_dpo_gradient_is_the_fp64_gradient() -> None:
    """In fp32, against the same loss in fp64: what lets pandallm match a reference implementation step by step."""
    grads = {}
    for dtype in (torch.float32, torch.float64):
        m = module(DPO(beta=0.1))
        m.model.to(dtype)
        m.reference_logps = lambda batch, stage: REFERENCE
        terms = m.objective.terms(m, batch(), "train")
        (terms.loss_sum / terms.count).backward()
        grads[dtype] = {name: p.grad.double() for name, p in m.named_parameters()}
    for name, exact in grads[torch.float64].items():
        assert (grads[torch.float32][name] - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DPO(beta=0), "beta of DPO must be positive"),
        (lambda: DPO(label_smoothing=0.5), r"label_smoothing of DPO must be in \[0, 0.5\)"),
        (lambda: DPO(loss_type="ipo", label_smoothing=0.1), "applies to loss_type sigmoid, not ipo"),
        (lambda: SimPO(beta=-1), "beta of SimPO must be positive"),
    ],
)
def test_bad_options_are_refused(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_kto_is_its_formula() -> None:
    """Sequence 0 of each record is its own completion, sequence 1 a mismatched one; record 0 is desirable."""
    beta, weights = 0.2, (1.0, 1.5)
    m = module(KTO(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]))
    b = {**batch(), "desirable": torch.tensor([True, False])}
    m.reference_logps = lambda batch, stage: REFERENCE
    terms = m.objective.terms(m, b, "train")
    policy, _ = completion_logps(m)
    ratios = [p - r for p, r in zip(policy, REFERENCE.tolist(), strict=True)]
    z = max(0.0, (ratios[2] + ratios[3]) / 2)  # the mismatched sequences' mean log-ratio, clamped at 0

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = [weights[0] * (1 - sigmoid(beta * (ratios[0] - z))), weights[1] * (1 - sigmoid(beta * (z - ratios[1])))]
    assert (terms.loss_sum / terms.count).item() == pytest.approx(sum(expected) / 2, rel=1e-9)
    means = m.objective.means(terms.count, [terms.metrics[name] for name in m.objective.metric_names])
    assert means["rewards/chosen"].item() == pytest.approx(beta * ratios[0], rel=1e-9)  # over desirable records only
    assert means["rewards/rejected"].item() == pytest.approx(beta * ratios[1], rel=1e-9)
    assert means["kl"].item() == pytest.approx(z, rel=1e-9)
