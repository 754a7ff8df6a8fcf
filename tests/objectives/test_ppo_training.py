"""PPO, and GRPO with several steps per rollout, on the shared machinery: a tiny model learns a verifiable toy task, a
run killed between two steps of one rollout resumes exactly (the kept rollout comes from the checkpoint), the value
head is checkpointed and not exported, and rows that do not repeat as the steps need are refused."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pandallm.cli import cli
from pandallm.errors import ConfigError
from tests.conftest import TOKENIZER_DIR, metric_column, write_jsonl
from tests.objectives.online import ENDS_WITH_WATER, LENGTH_REWARD, common, length_prompts, prompts
from tests.test_resume import fit, losses

pytestmark = pytest.mark.integration


def rl_args(root: Path, model: str, name: str, objective: str, *extra: str) -> list[str]:
    write_jsonl(root / "rl" / "a.jsonl", prompts(64))
    tokenizer = [] if Path(model).exists() else [f"--model.tokenizer={TOKENIZER_DIR}"]
    return [
        "fit",
        *common(root, name),
        f"--model.model_name_or_path={model}",
        *tokenizer,
        f"--model.objective={objective}",
        f"--data.instruction_tuning_data_dir={root / 'rl'}",
        "--data.per_device_train_batch_size=4",
        *extra,
    ]


def test_a_tiny_model_learns_to_end_with_the_rewarded_word_with_ppo(tmp_path: Path, sft_model: Path) -> None:
    run = cli(
        rl_args(
            tmp_path,
            str(sft_model),
            "ppo",
            "PPO",
            "--trainer.max_steps=16",
            "--model.learning_rate=1e-2",
            f"--model.objective.rewards={ENDS_WITH_WATER}",
            "--model.objective.ppo_epochs=2",
            "--model.objective.num_generations=4",
            "--model.objective.max_new_tokens=4",
            "--model.objective.log_samples_every_n_steps=1",
        )
    )
    log_dir = Path(run.trainer.log_dir)
    rewards = metric_column(log_dir, "train/reward")
    assert len(rewards) == 16
    # Two optimizer steps per rollout: each rollout's reward is logged at both (one sampling, not two).
    assert rewards[0::2] == rewards[1::2]
    per_rollout = rewards[0::2]
    # From near the SFT model's rate (1 in 16 of its data) to above 0.75: measured 0.06, 0.12, 0.44, 0.88, 0.62,
    # 0.94, 0.94, 0.81 (the same on every run: the rollouts are seeded).
    assert per_rollout[0] < 0.2, per_rollout
    assert sum(per_rollout[-3:]) / 3 > 0.75, per_rollout
    # The second step of a rollout trains against the first's probabilities: its ratios move, and some are clipped.
    assert max(metric_column(log_dir, "train/clip_ratio")[1::2]) > 0
    samples = [json.loads(line) for line in (log_dir / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == list(range(0, 16, 2))  # written when sampled
    # The value head trains and is checkpointed; the export is the policy alone, a plain causal LM.
    [checkpoint] = (log_dir / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state["heads.value.weight"].abs().sum() > 0
    export = log_dir / "hf"
    assert not any("value" in key for key in load_file(export / "model.safetensors"))
    AutoModelForCausalLM.from_pretrained(export)


LORA_PPO_3_STEPS_PER_ROLLOUT = [
    "--model.use_lora=true",
    "--model.lora_r=8",
    "--model.learning_rate=3e-2",
    "--model.objective=PPO",
    f"--model.objective.rewards={LENGTH_REWARD}",
    "--model.objective.ppo_epochs=3",
    "--model.objective.num_generations=2",
    "--model.objective.max_new_tokens=4",
    "--model.objective.kl_coef=0.1",
    "--model.objective.kl_target=0.5",  # an adaptive KL weight: the checkpoint must hold it as adapted so far
    "--model.objective.kl_horizon=20",
]


def killed_after(step: int, root: Path, data: dict[str, str], args: list[str]) -> None:
    """The run uninterrupted ("straight"), and killed with SIGKILL after `step` ("resumed", checkpoints every 2)."""
    fit(root, "straight", data, *args)
    kill = ["--trainer.callbacks+=tests.helpers.KillAtStep", f"--trainer.callbacks.step={step}"]
    fit(root, "resumed", data, *args, *kill, expect_code=-9)


def test_lora_ppo_resumed_between_two_steps_of_a_rollout_is_exact(tmp_path: Path) -> None:
    # Three steps per rollout, checkpoints every 2 steps, killed after step 5: resumed from step 4, in the middle of
    # the second rollout (steps 3-5), which comes from the checkpoint (sampling it again from the moved policy would
    # differ), with the KL weight adapted after the first one.
    data = length_prompts(tmp_path)
    ppo = [*LORA_PPO_3_STEPS_PER_ROLLOUT, "--trainer.max_steps=9"]
    killed_after(5, tmp_path, data, ppo)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and saved["pandallm"]["rollouts"][0]  # the rollout of steps 3-5, kept
    assert saved["pandallm"]["kl_coef"] != 0.1
    fit(tmp_path, "resumed", data, *ppo, "--ckpt_path=last")
    straight, resumed = losses(tmp_path, "straight"), losses(tmp_path, "resumed")
    # Stopped at 9 steps (of the 24 of 2 epochs: 12 prompts, 3 per batch, 3 steps per rollout).
    assert 5 in resumed and max(straight) == 8
    assert resumed == straight  # every step's loss, as logged text: bit-exact floats
    assert len(set(straight.values())) == 9  # the run trains: every step's loss differs
    [log_dir] = (tmp_path / "straight").glob("version_*")
    weights = metric_column(log_dir, "train/kl_coef")  # adapted after steps 2, 5, 8: constant within a rollout
    assert weights[0:3] == [pytest.approx(0.1)] * 3 and weights[3:6] == [weights[3]] * 3 != weights[6:9], weights
    exports = [
        sorted((tmp_path / name).glob("version_*/hf/adapter_model.safetensors")) for name in ("straight", "resumed")
    ]
    a, b = (load_file(found[-1]) for found in exports)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_with_several_iterations_reuses_each_rollout_and_clips(tmp_path: Path) -> None:
    run = cli(
        rl_args(
            tmp_path,
            "llama-tiny",
            "grpo",
            "GRPO",
            "--trainer.max_steps=6",
            "--model.learning_rate=3e-2",
            f"--model.objective.rewards={LENGTH_REWARD}",
            "--model.objective.num_iterations=3",
            "--model.objective.num_generations=2",
            "--model.objective.max_new_tokens=4",
            "--model.objective.epsilon=0.05",
            "--trainer.accumulate_grad_batches=2",  # a rollout of two micro-batches, each kept and taken back
        )
    )
    log_dir = Path(run.trainer.log_dir)
    rewards = metric_column(log_dir, "train/reward")
    assert rewards[0:3] == [rewards[0]] * 3 and rewards[3:6] == [rewards[3]] * 3
    clip = metric_column(log_dir, "train/clip_ratio")
    assert clip[0] == 0 and clip[3] == 0  # the first step of a rollout is on-policy
    assert max(clip[1:3] + clip[4:6]) > 0  # the later ones are not: epsilon clips them


def test_rows_that_do_not_repeat_for_the_steps_of_a_rollout_are_refused(tmp_path: Path) -> None:
    # Modules built without the CLI's link: the objective takes 2 steps per rollout, the data repeats nothing.
    args = rl_args(
        tmp_path,
        "llama-tiny",
        "unlinked",
        "PPO",
        "--trainer.max_steps=2",
        f"--model.objective.rewards={LENGTH_REWARD}",
        "--model.objective.ppo_epochs=2",
        "--model.objective.max_new_tokens=2",
        "--data.shuffle=true",
    )
    run = cli(args[1:], run=False)
    run.datamodule.rollout_passes = 1
    with pytest.raises(ConfigError, match="PPO takes ppo_epochs=2 optimizer steps per rollout, but data.rollout_pas"):
        run.trainer.fit(run.model, datamodule=run.datamodule)

    # An epoch cut short (limit_train_batches: 3 batches, a rollout and a half) ends with the rollout it cut; the next
    # epoch starts a new one (a micro-batch's place in its rollout is its place in its epoch).
    longer = [arg for arg in args[1:] if not arg.startswith("--trainer.max_steps")]
    run = cli(["fit", *longer, "--trainer.max_steps=5", "--trainer.limit_train_batches=3"])
    assert len(metric_column(Path(run.trainer.log_dir), "train/reward")) == 5


class SaveAtBatch(L.Callback):
    """Saves a checkpoint after training batch `batch` of the first epoch, wherever it falls: what a validation with
    `val_check_interval` does inside an accumulation window."""

    def __init__(self, batch: int, path: str) -> None:
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_saved_between_two_micro_batches_of_a_rollout_resumes_inside_it(tmp_path: Path) -> None:
    # 2 micro-batches per step, 2 steps per rollout: batch 4 is the first micro-batch of the second rollout's first
    # step. The checkpoint saved after it holds that micro-batch's kept rollout, which the rollout's second step
    # trains on again after the resume (the micro-batch itself is not trained again: its gradient was not saved, as
    # for any objective resumed inside an accumulation window).
    args = rl_args(
        tmp_path,
        "llama-tiny",
        "ppo",
        "PPO",
        "--model.use_lora=true",
        "--model.lora_r=8",
        f"--model.objective.rewards={LENGTH_REWARD}",
        "--model.objective.ppo_epochs=2",
        "--model.objective.num_generations=2",
        "--model.objective.max_new_tokens=3",
        "--trainer.accumulate_grad_batches=2",
        "--data.per_device_train_batch_size=2",
    )
    saved = tmp_path / "inside.ckpt"
    cli(
        [
            *args,
            "--trainer.max_steps=3",
            f"--trainer.callbacks+={__name__}.SaveAtBatch",
            "--trainer.callbacks.batch=4",
            f"--trainer.callbacks.path={saved}",
        ]
    )
    state = torch.load(saved, weights_only=True)
    assert state["global_step"] == 2 and list(state["pandallm"]["rollouts"][0]) == [0]
    run = cli([*args, "--trainer.max_steps=6", f"--ckpt_path={saved}"])
    steps = metric_column(Path(run.trainer.log_dir), "train/reward")
    # Steps 2-5: the rest of the rollout (step 2 without the micro-batch trained before the save, step 3 with both,
    # the first one taken back from the checkpoint), then the next rollout, the same at its two steps.
    assert len(steps) == 4 and steps[2] == steps[3]


@pytest.mark.slow  # six processes: past the default suite's budget; the single-process resume test stays in it
def test_two_process_ddp_ppo_resumed_between_two_steps_of_a_rollout_is_exact(tmp_path: Path) -> None:
    # Every rank keeps the rollout of its own prompts: the checkpoint holds both, each rank takes its own back.
    data = length_prompts(tmp_path)
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.per_device_train_batch_size=2"]
    ppo = [*LORA_PPO_3_STEPS_PER_ROLLOUT, *ddp, "--trainer.max_steps=6"]
    killed_after(3, tmp_path, data, ppo)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(saved["pandallm"]["rollouts"]) == [0, 1]
    fit(tmp_path, "resumed", data, *ppo, "--ckpt_path=last")
    straight, resumed = losses(tmp_path, "straight"), losses(tmp_path, "resumed")
    assert 3 in resumed and max(straight) == 5
    assert resumed == straight


def test_ppo_from_a_reward_model_trained_by_pandallm(tmp_path: Path) -> None:
    # LLMBox's workflow: a RewardModel run's export scores the policy's completions (the same tokenizer).
    write_jsonl(
        tmp_path / "pairs" / "a.jsonl",
        [{"prompt": f"Say something about {i}.", "chosen": "water.", "rejected": "good."} for i in range(8)],
    )
    rm = cli(
        [
            "fit",
            *common(tmp_path, "rm"),
            "--trainer.max_steps=2",
            "--model.model_name_or_path=llama-tiny",
            f"--model.tokenizer={TOKENIZER_DIR}",
            "--model.objective=RewardModel",
            f"--data.instruction_tuning_data_dir={tmp_path / 'pairs'}",
            "--data.per_device_train_batch_size=2",
        ]
    )
    reward_model = Path(rm.trainer.log_dir) / "hf"
    run = cli(
        rl_args(
            tmp_path,
            "llama-tiny",
            "ppo",
            "PPO",
            "--trainer.max_steps=2",
            f"--model.objective.rewards=[{{model: {reward_model}, weight: 2.0}}]",
            "--model.objective.ppo_epochs=2",
            "--model.objective.max_new_tokens=3",
        )
    )
    scores = metric_column(Path(run.trainer.log_dir), "train/rewards/reward_model")
    rewards = metric_column(Path(run.trainer.log_dir), "train/reward")
    assert len(scores) == 2 and scores[0] == scores[1] != 0  # one rollout, scored by the model, for two steps
    assert rewards == pytest.approx([2.0 * s for s in scores])
