"""GRPO on the shared machinery: a tiny model learns a verifiable toy task, a run killed mid-way resumes exactly
(rollouts included), LoRA's reference is the base with the adapters disabled, and bad rewards or prompts are refused
naming the function or the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pandallm.cli import cli
from pandallm.errors import ConfigError, DataFormatError, RewardError
from tests.conftest import TOKENIZER_DIR, metric_column, write_jsonl
from tests.objectives.online import ENDS_WITH_WATER, LENGTH_REWARD, common, length_prompts, prompts
from tests.test_resume import assert_resume_is_exact, fit, losses

pytestmark = pytest.mark.integration


def grpo_args(root: Path, model: Path, name: str, *extra: str) -> list[str]:
    write_jsonl(root / "rl" / "a.jsonl", prompts(64))
    return [
        "fit",
        *common(root, name),
        f"--model.model_name_or_path={model}",
        "--model.objective=GRPO",
        f"--model.objective.rewards={ENDS_WITH_WATER}",
        "--model.objective.num_generations=8",
        "--model.objective.max_new_tokens=6",
        f"--data.instruction_tuning_data_dir={root / 'rl'}",
        "--data.per_device_train_batch_size=4",
        *extra,
    ]


def test_a_tiny_model_learns_to_end_with_the_rewarded_word(tmp_path: Path, sft_model: Path) -> None:
    run = cli(grpo_args(tmp_path, sft_model, "grpo", "--trainer.max_steps=12", "--model.learning_rate=1e-2"))
    rewards = metric_column(Path(run.trainer.log_dir), "train/reward")
    assert len(rewards) == 12
    # From near the SFT model's rate (1 in 16 of its data) to above 0.8: measured 0.03, 0.06, 0.19, 0.50, 0.53, 0.72,
    # 0.31, 0.50, 0.84, 0.94, 0.94, 1.0 (the same on every run: the rollouts are seeded).
    assert sum(rewards[:2]) / 2 < 0.3, rewards
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    samples = [json.loads(line) for line in (Path(run.trainer.log_dir) / "rollouts.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0} and len(samples) == 32  # step 0's 4 prompts x 8 completions


# Past the default suite's budget: there, the LoRA PPO resume test (test_ppo_training.py) resumes the same rollout
# machinery (rollouts sampled again from their seeds after the resume, and a rollout kept in the checkpoint).
@pytest.mark.slow
def test_lora_grpo_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    # Killed after step 3 (checkpoints every 2 steps), resumed from step 2: the rollouts of steps 3 and on are sampled
    # again from their own seeds, the same completions; with dropout on, and a KL to the base with the adapters
    # disabled. A length reward differs between any two completions of a random model: every step updates.
    data = length_prompts(tmp_path)
    grpo = [
        "--model.use_lora=true",
        "--model.lora_r=8",
        "--model.learning_rate=3e-2",
        "--model.objective=GRPO",
        f"--model.objective.rewards={LENGTH_REWARD}",
        "--model.objective.num_generations=2",
        "--model.objective.max_new_tokens=4",
        "--model.objective.beta=0.1",
    ]
    fit(tmp_path, "straight", data, *grpo)
    kill = ["--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=3"]
    fit(tmp_path, "resumed", data, *grpo, *kill, expect_code=-9)
    fit(tmp_path, "resumed", data, *grpo, "--ckpt_path=last")
    straight, resumed = losses(tmp_path, "straight"), losses(tmp_path, "resumed")
    assert 3 in resumed and max(straight) == 7
    assert resumed == straight  # every step's loss, as logged text: bit-exact floats
    assert len(set(straight.values())) > 4  # the run trains: the losses are not all the same
    exports = [
        sorted((tmp_path / name).glob("version_*/hf/adapter_model.safetensors")) for name in ("straight", "resumed")
    ]
    a, b = (load_file(found[-1]) for found in exports)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three processes more, past the default suite's budget for GRPO: the LoRA resume test stays in it
def test_full_grpo_resume_after_sigkill_is_exact(tmp_path: Path, sft_model: Path) -> None:
    # Full training with a KL term: the reference, a frozen copy of the starting model, is loaded again from its
    # directory on resume.
    assert_resume_is_exact(
        tmp_path,
        length_prompts(tmp_path),
        3,
        f"--model.model_name_or_path={sft_model}",
        "--model.objective=GRPO",
        f"--model.objective.rewards={LENGTH_REWARD}",
        "--model.objective.num_generations=2",
        "--model.objective.max_new_tokens=4",
        "--model.objective.beta=0.1",
    )


@pytest.mark.slow  # two processes of their own: 25-50 s on two cores, past the default suite's budget for GRPO
def test_two_process_ddp_grpo_samples_every_group_on_its_own_rank(tmp_path: Path) -> None:
    # Samples written every step: only rank 0 writes them, and every rank takes part in Lightning's broadcast of the
    # log directory (rank 0 alone waited on it forever).
    grpo = [
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--data.per_device_train_batch_size=2",
        "--model.use_lora=true",
        "--model.objective=GRPO",
        f"--model.objective.rewards={LENGTH_REWARD}",
        "--model.objective.num_generations=3",
        "--model.objective.max_new_tokens=4",
        "--model.objective.beta=0.1",
        "--model.objective.log_samples_every_n_steps=1",
    ]
    fit(tmp_path, "ddp", length_prompts(tmp_path), *grpo)
    [log_dir] = (tmp_path / "ddp").glob("version_*")
    assert len(metric_column(log_dir, "train/reward")) == 2
    samples = [json.loads(line) for line in (log_dir / "rollouts.jsonl").read_text().splitlines()]
    # Rank 0's 2 prompts x 3 completions per step, each prompt's group together.
    assert [s["step"] for s in samples] == [0] * 6 + [1] * 6
    assert all(len({s["prompt"] for s in samples[i : i + 3]}) == 1 for i in range(0, 12, 3))


def test_lora_grpo_uses_the_base_with_adapters_disabled_as_its_reference(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rl" / "a.jsonl", prompts(12))
    run = cli(
        error_args(
            tmp_path,
            "--trainer.max_steps=3",
            "--model.use_lora=true",
            "--model.lora_r=8",
            "--model.learning_rate=3e-2",
            f"--model.objective.rewards={LENGTH_REWARD}",
            "--model.objective.beta=0.5",
            "--model.objective.max_new_tokens=4",
        )
    )
    module = run.model
    assert module.is_adapter_run and module.reference_scores.model is None  # no second copy of the model
    kl = metric_column(Path(run.trainer.log_dir), "train/kl")
    # Fresh adapters leave the policy equal to the base: no KL at step 0; the adapters move it away after.
    assert kl[0] == 0.0 and kl[-1] > 0, kl


def bad_count(completions: list[str], **_) -> list[float]:
    return [0.0] * (len(completions) - 1)


def not_a_float(completions: list[str], **_) -> list:
    return ["1.0"] * len(completions)


def bonus_field(completions: list[str], bonus: list[float], reference: list, **_) -> list[float]:
    # Each record's own field, one value per completion; no reference in `{"prompt"}` records without a completion.
    assert reference == [None] * len(completions)
    return [float(b) for b in bonus]


def error_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *common(root, "errors"),
        "--trainer.max_steps=1",
        "--export.enabled=false",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        "--model.objective=GRPO",
        "--model.objective.num_generations=2",
        "--model.objective.max_new_tokens=2",
        f"--data.instruction_tuning_data_dir={root / 'rl'}",
        "--data.per_device_train_batch_size=2",
        *extra,
    ]


@pytest.mark.parametrize(
    ("function", "error", "expected"),
    [
        ("no_such_module:f", ConfigError, r"rewards\[0\]\.function: cannot import module 'no_such_module'"),
        ("pandallm.rewards:no_such", ConfigError, r"module 'pandallm.rewards' has no function 'no_such'"),
        (f"{__name__}:bad_count", RewardError, "reward function 'bad_count' returned 3 values for 4 completions"),
        (f"{__name__}:not_a_float", RewardError, r"'not_a_float' returned '1.0' for the completion of the prompt at "),
    ],
)
def test_bad_rewards_are_refused_naming_the_function(tmp_path: Path, function: str, error: type, expected: str) -> None:
    write_jsonl(tmp_path / "rl" / "a.jsonl", prompts(4))
    with pytest.raises(error, match=expected):
        cli(error_args(tmp_path, f'--model.objective.rewards=[{{function: "{function}"}}]'))


def test_record_fields_reach_the_reward_functions(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rl" / "a.jsonl", [{"prompt": f"Q{i}?", "bonus": i} for i in range(4)])
    run = cli(
        error_args(
            tmp_path,
            f'--model.objective.rewards=[{{function: "{__name__}:bonus_field"}}]',
            "--data.shuffle=false",
            "--trainer.max_steps=2",
        )
    )
    # Steps 0 and 1 take records 0-1 and 2-3: their mean bonus.
    assert metric_column(Path(run.trainer.log_dir), "train/reward") == [0.5, 2.5]


def test_a_prompt_longer_than_the_limit_is_refused_naming_the_record_or_dropped_and_counted(tmp_path: Path) -> None:
    records = [*prompts(3), {"input": "Say something about " + "the sea and the sky " * 30}]
    write_jsonl(tmp_path / "rl" / "a.jsonl", records)
    rewards = '--model.objective.rewards=[{function: "pandallm.rewards:ends_with"}]'
    with pytest.raises(
        DataFormatError, match=r"a\.jsonl:4: the prompt is \d+ tokens, longer than data.max_seq_length=32"
    ):
        cli(error_args(tmp_path, rewards, "--data.max_seq_length=32"))
    run = cli(error_args(tmp_path, rewards, "--data.max_seq_length=32", "--data.overlong_records=drop")[1:], run=False)
    run.datamodule.setup("fit")
    assert len(run.datamodule.datasets["train"]) == 3
    assert run.datamodule.data_notes["groups"]["train_0"]["overlong"] == {"prompts": 1}
