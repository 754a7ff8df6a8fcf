"""What a command prints: a user error as one line (a traceback only on request), the nearest keys to a misspelled
one, no libraries' notices that ask nothing of the user, and `--help` without the heavy libraries."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pandallm.cli import TRACEBACK_ENV, main
from pandallm.console import quiet
from pandallm.errors import DatasetError
from tests.conftest import REPO, tiny_fit_args

HEAVY = ("torch", "lightning", "transformers", "datasets", "peft", "bitsandbytes")


def test_a_user_error_in_fit_is_one_line_and_a_traceback_only_on_request(tmp_path: Path, capsys, monkeypatch) -> None:
    args = ["fit", *tiny_fit_args(tmp_path), "--data.val_fraction=1.5"]
    with pytest.raises(SystemExit) as exit_:
        main(args, report=True)  # as from the shell
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "pandallm fit: error: data.val_fraction must be in [0, 1), got 1.5" in err
    assert "Traceback" not in err
    with pytest.raises(DatasetError, match="val_fraction"):
        main([*args, "--traceback"], report=True)
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(DatasetError, match="val_fraction"):
        main(args, report=True)


def test_a_misspelled_key_names_the_nearest_valid_key_without_the_usage(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for given, nearest in [("--trainer.max_step=5", "trainer.max_steps"), ("--max_steps=5", "trainer.max_steps")]:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", "recipes/tiny.yaml", given])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"did you mean `{nearest}`?" in err
        assert "usage:" not in err and len(err.splitlines()) <= 4


@pytest.mark.parametrize(
    ("command", "given", "nearest"),
    [
        ("self-instruct", "--num_instruction=5", "--num_instructions"),
        ("quantize", "--group_sise=64", "--group_size"),
        ("extend-vocab", "--user_symbol=s.json", "--user_symbols"),
    ],
)
def test_a_misspelled_tool_option_names_the_nearest_without_the_usage(capsys, command, given, nearest) -> None:
    # The tools printed their whole usage, under the name `__main__.py`, and no suggestion.
    with pytest.raises(SystemExit) as exit_:
        main([command, given])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pandallm {command}: error: unrecognized arguments: {given.split('=')[0]}")
    assert f"did you mean `{nearest}`?" in err
    assert "usage:" not in err and "__main__" not in err and len(err.splitlines()) <= 4


def test_notices_that_ask_nothing_are_dropped_and_the_others_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet("validate")
        warnings.warn("The `srun` command is available on your system but is not used. HINT: ...", stacklevel=1)
        warnings.warn("Checkpoint directory runs/tiny/checkpoints exists and is not empty.", stacklevel=1)
        warnings.warn("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint ...", stacklevel=1)
        warnings.warn("`ModelCheckpoint(monitor='val/loss')` could not find the monitored key", stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`ModelCheckpoint(monitor='val/loss')` could not find the monitored key"
    ]
    bitsandbytes = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = bitsandbytes.makeRecord(
        bitsandbytes.name,
        logging.WARNING,
        __file__,
        1,
        "Failed to load CPU gemm_4bit_forward from kernels-community: x",
        (),
        None,
    )
    assert not bitsandbytes.filter(record)


def test_the_help_and_a_tool_commands_help_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from pandallm.cli import main\n"
        "for args in (['--help'], ['data', '--help'], ['train-tokenizer', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: []" in done.stdout


def test_help_into_a_closed_pipe_ends_without_a_traceback() -> None:
    # `pandallm --help | head`: a reader that has gone before the usage is written (`true` reads nothing and exits
    # while Python starts).
    script = f"{sys.executable} -m pandallm --help | true; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_each_package_imports_first_in_a_fresh_process() -> None:
    # A circular import shows only in the order that starts it: `import pandallm.objectives` first failed while
    # every test (which imports the CLI first) passed.
    packages = sorted(
        p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in REPO.glob("pandallm/*/__init__.py")
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        for name in packages
    }
    failed = {name: p.communicate(timeout=300)[1].strip().splitlines()[-1:] for name, p in started.items()}
    assert {name: err for name, err in failed.items() if started[name].returncode} == {}
