"""Sweep files: parsing, selecting an entry by index or SLURM array task, and each entry's own run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm import sweep
from pandallm.cli import cli
from pandallm.errors import ConfigError
from tests.conftest import REPO, TOKENIZER_DIR

ARRAY_TASK = {"SLURM_JOB_ID": "108", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "2"}


@pytest.fixture
def points(tmp_path: Path) -> Path:
    path = tmp_path / "points.yaml"
    path.write_text(
        "- {model.learning_rate: 1.0e-3}\n"
        "- model.learning_rate: 3.0e-3\n"
        "  data.per_device_train_batch_size: 2\n"
        "- model: {learning_rate: 1.0e-2, lr_scheduler: constant}\n"
        "  model.warmup_steps: 0\n"
    )
    return path


def test_entries_in_dotted_and_nested_form_become_nested_overrides(points: Path) -> None:
    assert sweep.load_points(points) == [
        {"model": {"learning_rate": 1e-3}},
        {"model": {"learning_rate": 3e-3}, "data": {"per_device_train_batch_size": 2}},
        {"model": {"learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0}},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model.learning_rate: 1.0e-3\n", "expected a non-empty YAML list of override sets, got dict"),
        ("[]\n", "expected a non-empty YAML list"),
        ("- {model.learning_rate: 1.0e-3}\n- 0.1\n", "entry 1: expected a mapping of config keys to values, got float"),
        ("- {model..learning_rate: 1.0e-3}\n", "entry 0: 'model..learning_rate' is not a config key"),
        (
            "- {model.learning_rate: 1.0e-3, model: {learning_rate: 2.0e-3}}\n",
            "entry 0: key 'model': 'learning_rate' is set",
        ),
        ("- {model: 1, model.learning_rate: 1.0e-3}\n", "entry 0: key 'model.learning_rate' conflicts"),
        ("- [unclosed\n", "not valid YAML"),
    ],
)
def test_malformed_sweep_files_are_refused_with_the_file_and_entry_named(tmp_path: Path, text, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as error:
        sweep.load_points(path)
    assert message in str(error.value)


def test_missing_sweep_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing.yaml: cannot read the sweep file"):
        sweep.load_points(tmp_path / "nothing.yaml")


def test_index_comes_from_the_option_or_the_array_task_and_must_be_in_range(points: Path) -> None:
    entries = sweep.load_points(points)
    assert sweep.resolve_index(1, ARRAY_TASK) == 1
    assert sweep.resolve_index(None, ARRAY_TASK) == 2
    with pytest.raises(ConfigError, match="--sweep_index, or a SLURM job array"):
        sweep.resolve_index(None, {"SLURM_JOB_ID": "7"})
    with pytest.raises(ConfigError, match=r"index 3 is out of range; the file has 3 entries .* --array=0-2"):
        sweep.select(entries, 3, points)


def test_run_names_follow_the_array_job_and_task() -> None:
    assert sweep.run_name(2, ARRAY_TASK) == "100_2"  # stable across requeues: not the task's own job id 108
    assert sweep.run_name(1, ARRAY_TASK) == "100_1"  # --sweep_index given inside an array task
    assert sweep.run_name(1, {"SLURM_JOB_ID": "7"}) == "7_1"
    assert sweep.run_name(1, {}) == "sweep_1"


def build(tmp_path: Path, *args: str):
    overrides = [
        "--trainer.accelerator=cpu",
        f"--trainer.logger.save_dir={tmp_path / 'runs'}",
        f"--trainer.callbacks.dirpath={tmp_path / 'shared-checkpoints'}",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]
    return cli(["--config", str(REPO / "recipes" / "tiny.yaml"), *overrides, *args], run=False)


def test_selected_entry_is_applied_last_and_gets_its_own_run_directory(points, tmp_path, monkeypatch) -> None:
    for key, value in ARRAY_TASK.items():
        monkeypatch.setenv(key, value)
    built = build(tmp_path, "--sweep", str(points), "--model.learning_rate=0.5", "--model.warmup_steps=7")
    model = built.model.hparams
    assert (model.learning_rate, model.lr_scheduler, model.warmup_steps) == (1e-2, "constant", 0)  # entry 2 wins
    run_dir = tmp_path / "runs" / "tiny" / "100_2"
    assert Path(built.trainer.logger.save_dir) == tmp_path / "runs" / "tiny"
    assert built.trainer.logger.name == "100_2"
    assert Path(built.trainer.log_dir).parent == run_dir  # versions of this task's (re)starts inside
    assert Path(built.trainer.checkpoint_callback.dirpath) == run_dir / "checkpoints"


def test_sweep_entry_with_an_unknown_key_fails_like_any_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("- {model.learning_rat: 0.1}\n")
    with pytest.raises(SystemExit):
        build(tmp_path, "--sweep", str(path), "--sweep_index=0")
    err = capsys.readouterr().err
    assert "typo.yaml, entry 0: model.learning_rat=0.1" in err and "learning_rat" in err.split("entry 0")[1]


def test_shipped_sweep_example_applies_to_a_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    example = REPO / "recipes" / "slurm" / "sweep_example.yaml"
    for index in range(len(sweep.load_points(example))):
        built = build(tmp_path, "--sweep", str(example), f"--sweep_index={index}")
        assert built.trainer.checkpoint_callback.dirpath.endswith(f"sweep_{index}/checkpoints")
