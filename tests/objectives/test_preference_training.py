"""Preference objectives on the shared machinery: exact resume after SIGKILL, DDP equal to one process, a toy
preference learned, and bad input refused naming the place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pandallm.cli import cli
from pandallm.errors import DataFormatError
from tests.conftest import INSTRUCTIONS, TOKENIZER_DIR, metric_column, write_jsonl
from tests.test_parallel import assert_same_training
from tests.test_resume import assert_resume_is_exact, fit

pytestmark = pytest.mark.integration


def preference_data(root: Path, pairs: int = 18) -> dict[str, str]:
    records = [
        {"prompt": f"Question {i}: what colour is the sky?", "chosen": "Blue, on a clear day.", "rejected": f"No. {i}"}
        for i in range(pairs)
    ]
    write_jsonl(root / "pairs" / "a.jsonl", records)
    return {"instruction_tuning_data_dir": str(root / "pairs"), "pretraining_data_dir": "null"}


def test_dpo_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    # Killed after step 3 (checkpoints every 2 steps): the reference scores come back from the checkpoint, which was
    # saved after the policy moved away from the reference.
    assert_resume_is_exact(tmp_path, preference_data(tmp_path), 3, "--model.objective=DPO")


def test_two_process_ddp_dpo_matches_one_process(tmp_path: Path) -> None:
    data = preference_data(tmp_path, pairs=24)
    same = [
        "--trainer.max_steps=6",
        "--data.shuffle=false",
        "--model.config_overrides={attention_dropout: 0.0}",
        "--model.objective=DPO",
    ]
    fit(tmp_path, "single", data, *same, "--data.per_device_train_batch_size=4")
    # Each rank scores half of the pairs with the reference and gathers the rest: the same scores as one process.
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.per_device_train_batch_size=2"]
    fit(tmp_path, "ddp", data, *same, *ddp)
    assert_same_training(tmp_path, "ddp", tmp_path)


def toy_pairs(count: int, offset: int = 0) -> list[dict]:
    # The preferred answers end with the word "indeed"; the two sides are otherwise the same sentence.
    subjects = ["the sky", "grass", "snow", "the sea", "a lemon", "coal", "milk", "a tomato"]
    colours = ["blue", "green", "white", "blue", "yellow", "black", "white", "red"]
    pairs = []
    for i in range(offset, offset + count):
        subject, colour = subjects[i % 8], colours[i % 8]
        answer = f"{subject.capitalize()} is {colour}"
        pairs.append(
            {"prompt": f"({i}) What colour is {subject}?", "chosen": f"{answer}, indeed.", "rejected": f"{answer}."}
        )
    return pairs


def test_a_toy_preference_is_learned(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train" / "a.jsonl", toy_pairs(48))
    write_jsonl(tmp_path / "val.jsonl", toy_pairs(16, offset=100))  # prompts it never trained on
    run = cli(
        [
            "fit",
            "--trainer.accelerator=cpu",
            "--trainer.max_epochs=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.save_dir={tmp_path}",
            "--export.enabled=false",
            "--model.model_name_or_path=llama-tiny",
            f"--model.tokenizer={TOKENIZER_DIR}",
            "--model.learning_rate=3e-3",
            "--model.warmup_steps=0",
            "--model.objective=DPO",
            f"--data.instruction_tuning_data_dir={tmp_path / 'train'}",
            "--data.pretraining_data_dir=null",
            f"--data.val_files=[{tmp_path / 'val.jsonl'}]",
            "--data.per_device_train_batch_size=8",
            "--data.num_workers=0",
            f"--data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    accuracies = metric_column(Path(run.trainer.log_dir), "val/rewards/accuracies")
    margins = metric_column(Path(run.trainer.log_dir), "val/rewards/margins")
    assert accuracies[-1] > 0.9 and margins[-1] > margins[0]


def fit_args(root: Path, *extra: str) -> list[str]:
    logger = [] if any(arg.startswith("--trainer.logger") for arg in extra) else ["--trainer.logger=false"]
    return [
        "fit",
        *logger,
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--export.enabled=false",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        "--data.pretraining_data_dir=null",
        "--data.num_workers=0",
        f"--data.cache_dir={root / 'cache'}",
        *extra,
    ]


def test_preference_data_given_to_sft_and_sft_data_given_to_dpo_are_refused_naming_the_record(tmp_path: Path) -> None:
    preference = preference_data(tmp_path)["instruction_tuning_data_dir"]
    with pytest.raises(
        DataFormatError,
        match=r"a\.jsonl:1: a preference record \(preference\) where instruction .* with model.objective DPO",
    ):
        cli(fit_args(tmp_path, f"--data.instruction_tuning_data_dir={preference}"))
    write_jsonl(tmp_path / "sft" / "b.jsonl", INSTRUCTIONS)
    expected = r"b\.jsonl:1: an instruction record \(pandallm\) where preference .* with model.objective SFT"
    with pytest.raises(DataFormatError, match=expected):
        cli(fit_args(tmp_path, f"--data.instruction_tuning_data_dir={tmp_path / 'sft'}", "--model.objective=DPO"))


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "Hi", "chosen": "", "rejected": "Go."}, "field 'chosen': is empty"),
        ({"prompt": "Hi", "chosen": "Hello."}, "cannot tell the record kind"),
        ({"prompt": "Hi", "completion": "Hello.", "label": True}, "an unpaired record \\(kto\\) where preference"),
        ({"chosen": [{"role": "user", "content": "A"}], "rejected": [{"role": "user", "content": "B"}]}, "share no"),
    ],
)
def test_malformed_pairs_name_file_line_and_field(tmp_path: Path, record: dict, expected: str) -> None:
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match=rf"a\.jsonl:1: .*{expected}"):
        cli(fit_args(tmp_path, f"--data.instruction_tuning_data_dir={tmp_path / 'pairs'}", "--model.objective=DPO"))


@pytest.mark.parametrize("lora", [True, False])
def test_the_reference_scored_once_before_training_or_live_gives_the_same_training(tmp_path: Path, lora: bool) -> None:
    """LoRA: the base with the adapters disabled; full training: the policy before its first step, or a frozen copy."""
    data = preference_data(tmp_path)["instruction_tuning_data_dir"]
    adapters = ["--model.use_lora=true", "--model.lora_r=4", "--model.lora_dropout=0.0"] if lora else []

    def losses(reference: str) -> list[float]:
        run = cli(
            fit_args(
                tmp_path / reference,
                f"--data.instruction_tuning_data_dir={data}",
                "--trainer.max_steps=3",
                f"--trainer.logger.save_dir={tmp_path / reference}",
                "--trainer.log_every_n_steps=1",
                *adapters,
                "--model.config_overrides={attention_dropout: 0.0}",
                "--data.per_device_train_batch_size=4",
                "--model.objective=DPO",
                f"--model.objective.reference={reference}",
            )
        )
        return metric_column(Path(run.trainer.log_dir), "train/loss")

    precomputed = losses("precompute")
    # The policy is the reference at the first step (fresh adapters add nothing).
    assert precomputed[0] == pytest.approx(0.6931472, abs=1e-6) and precomputed[-1] != precomputed[0]
    assert losses("live") == pytest.approx(precomputed, abs=1e-6)


def judged(pairs: list[dict]) -> list[dict]:
    return [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]


def test_kto_learns_a_toy_preference_from_judged_completions(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train" / "a.jsonl", judged(toy_pairs(32)))
    write_jsonl(tmp_path / "val.jsonl", judged(toy_pairs(8, offset=100)))
    args = fit_args(
        tmp_path,
        f"--data.instruction_tuning_data_dir={tmp_path / 'train'}",
        f"--data.val_files=[{tmp_path / 'val.jsonl'}]",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=3",
        "--model.learning_rate=3e-3",
        "--model.warmup_steps=0",
        "--data.per_device_train_batch_size=8",
        "--model.objective=KTO",
    )
    run = cli(args)
    log_dir = Path(run.trainer.log_dir)
    desirable = metric_column(log_dir, "val/rewards/chosen")
    undesirable = metric_column(log_dir, "val/rewards/rejected")
    # On held-out prompts the desirable completions gain reward over the undesirable ones, and more with training.
    assert desirable[-1] - undesirable[-1] > desirable[0] - undesirable[0] and desirable[-1] > undesirable[-1]
