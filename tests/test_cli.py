"""Every shipped YAML parses and builds; bad keys fail with jsonargparse's message; big recipes stay lazy."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import yaml

from pandallm.cli import TOOLS, cli, main
from pandallm.model import PandaLLM
from tests.conftest import REPO, TOKENIZER_DIR

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.yaml"))
CONFIG_PIECES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Swap a GPU recipe's hardware and model for ones this machine has."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.num_workers=0",
    ]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_prints_its_config(recipe: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", recipe, "--print_config"])
    assert exit_.value.code in (0, None)
    assert "model_name_or_path:" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_with_tiny_overrides(recipe: str, tmp_path: Path) -> None:
    built = cli(["--config", recipe, *tiny_overrides(tmp_path)], run=False)  # run=False: no subcommand
    assert isinstance(built.model, PandaLLM)
    assert built.datamodule.tokenizer_name == str(TOKENIZER_DIR)  # linked from the model
    built.model.configure_model()
    assert built.model.num_parameters() < 1_000_000


@pytest.mark.parametrize("piece", CONFIG_PIECES)
def test_config_pieces_compose_with_a_recipe(piece: str, tmp_path: Path) -> None:
    args = ["fit", "--config", "recipes/tiny.yaml", "--config", piece, *tiny_overrides(tmp_path)]
    if "fsdp" in piece:  # FSDP needs GPUs: check that it parses and names real classes, without building it
        with pytest.raises(SystemExit) as exit_:
            main([*args[:5], "--print_config"])
        assert exit_.value.code in (0, None)
        return
    built = cli(args[1:], run=False)
    assert built.trainer.loggers


def test_65b_recipe_instantiates_without_allocating_65b_parameters(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    overrides = [a for a in tiny_overrides(tmp_path) if "model_name_or_path" not in a]
    built = cli(["--config", "recipes/llama65b.yaml", *overrides, "--model.model_name_or_path=llama-65b"], run=False)
    assert built.model.model is None  # built later, in configure_model, inside the strategy's context
    assert 64e9 < built.model.num_parameters() < 66e9  # counted on the meta device
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 1024 * 1024  # < 2 GiB, where 65B fp32 parameters would be 260 GB


def test_unknown_config_key_fails_with_the_key_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "recipes/tiny.yaml", "--data.max_seq_lenght=128"])
    assert exit_.value.code == 2
    assert "max_seq_lenght" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  learning_rat: 0.1\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "recipes/tiny.yaml", "--config", str(bad)])
    assert exit_.value.code == 2
    assert "learning_rat" in capsys.readouterr().err
    # A prefix of a real option is a typo too, not an abbreviation to expand silently.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "recipes/tiny.yaml", "--trainer.max_step=5", "--print_config"])
    assert exit_.value.code == 2
    assert "--trainer.max_step=5" in capsys.readouterr().err


def test_preset_without_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.tokenizer must be set"):
        PandaLLM(model_name_or_path="llama-7b")


def test_the_help_and_an_unknown_command_name_the_tool_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "tool commands (each with --help):" in shown
    assert all(f"\n  {name} " in shown for name in ["fit", "validate", "test", "predict", *TOOLS])
    with pytest.raises(SystemExit) as exit_:
        main(["exprot", "--output", "x"])
    assert exit_.value.code == 2
    assert "unknown command 'exprot'; the commands are fit, validate, test, predict, train-tokenizer" in (
        capsys.readouterr().err
    )


def test_a_runs_saved_config_is_read_by_export_whatever_options_fit_has(tmp_path: Path, capsys) -> None:
    from pandallm.cli import RUN_OPTIONS, RUN_SECTIONS
    from pandallm.tools.export import build_parser

    with pytest.raises(SystemExit):
        main(["fit", "--config", "recipes/tiny.yaml", "--print_config"])
    saved = tmp_path / "config.yaml"
    saved.write_text(capsys.readouterr().out)  # what LightningCLI saves as the run's config.yaml
    keys = set(yaml.safe_load(saved.read_text()))
    assert keys <= {"model", "export", "ckpt_path", *RUN_SECTIONS, *RUN_OPTIONS}, keys
    parsed = build_parser().parse_args(["--config", str(saved), "--ckpt_path", "x.ckpt", "--output", "hf"])
    assert parsed.model.model_name_or_path == "llama-mini"
