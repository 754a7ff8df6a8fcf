"""What the online RL tests share (GRPO, PPO): prompts, rewards and the CLI options of a run."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import write_jsonl

# Single-token words of the test tokenizer: the SFT model ends its replies with one of them, GRPO rewards one.
WORDS = ["good", "water", "one", "two", "time", "world", "people", "more"]
SUBJECTS = ["the sky", "grass", "snow", "the sea", "a lemon", "coal", "milk", "a tomato"]
ENDS_WITH_WATER = '[{function: "pandallm.rewards:ends_with", kwargs: {word: water}}]'


def prompts(count: int) -> list[dict]:
    return [{"input": f"Say something about {SUBJECTS[i % 8]}."} for i in range(count)]


def common(root: Path, name: str) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.logger.name={name}",
        "--model.warmup_steps=0",
        "--data.pretraining_data_dir=null",
        "--data.num_workers=0",
        f"--data.cache_dir={root / 'cache'}",
    ]


def length_prompts(root: Path) -> dict[str, str]:
    write_jsonl(root / "rl" / "a.jsonl", prompts(12))
    return {"instruction_tuning_data_dir": str(root / "rl"), "pretraining_data_dir": "null"}


LENGTH_REWARD = '[{function: "pandallm.rewards:length", kwargs: {chars: 12}}]'
