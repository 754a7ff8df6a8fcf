"""The README is true: every command, option, config piece and repository path in its code blocks exists, and the
figures it quotes of the demo are the demo's."""

from __future__ import annotations

import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from pandallm.cli import ALIASES, SUBCOMMANDS, TOOLS, main
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
# Where a path in a command is the repository's (anything else is the user's: runs/, data/, /path/to/...).
REPOSITORY_ROOTS = ("recipes/", "configs/", "dataset/", "tests/", "benchmarks/", "pandallm/", ".ci/", "constraints.txt")


def code_blocks(language: str = "") -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M) if m.group(1) == language]


def commands() -> list[list[str]]:
    """Each shell command of the README's plain code blocks, as argv (continuations joined, `&&` chains split,
    comments dropped); output shown in code blocks (`pandallm fit: error: ...`) is not a command."""
    found = []
    for block in code_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"(pandallm|pip|python3?|bash|sbatch|nox|\.)\s", line):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and not any(word.endswith(":") for word in argv[1:3]):  # `pandallm fit: error: ...`
                    found.append(argv)
    return found


def paths_in(argv: list[str]) -> list[str]:
    """The repository paths an argv names, in lists (`'[a, b]'`) and `--key=value` too."""
    words = [w for arg in argv for w in re.split(r"[\[\],=\s]+", arg) if w]
    return [w for w in words if w.startswith(REPOSITORY_ROOTS)]


@cache
def help_text(*command: str) -> str:
    """What `pandallm COMMAND --help` prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return out.getvalue()


def known_option(command: tuple[str, ...], option: str) -> bool:
    if command == ("estimate",) and known_option(("fit",), option):
        return True  # `pandallm estimate` takes pandallm fit's options besides its own
    shown = help_text(*command)
    if re.search(rf"(^|\s){re.escape(option)}(\s|=|,|$)", shown, re.M):
        return True
    # A subclass-typed option's own arguments (`--trainer.callbacks.every_n_train_steps`) are not listed one by one.
    parts = option.split(".")
    return any(re.search(rf"\s{re.escape('.'.join(parts[:n]))}\.help\s", shown) for n in range(2, len(parts)))


def test_the_readme_has_commands_to_check() -> None:
    found = commands()
    assert sum(argv[0] == "pandallm" for argv in found) > 20
    assert {argv[0] for argv in found} >= {"pandallm", "pip", "python", "bash", "sbatch", "nox"}


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv)[:60])
def test_every_command_and_path_in_the_readme_exists(argv: list[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for path in paths_in(argv):
        assert (REPO / path.rstrip("/")).exists(), f"{path} does not exist"
    program, args = argv[0], argv[1:]
    if program == "pandallm":
        assert args[0] in (*SUBCOMMANDS, *TOOLS, *ALIASES), f"no command pandallm {args[0]}"
        command = tuple(args[:2]) if args[0] == "data" else (ALIASES.get(args[0], args[0]),)
        if args[0] == "data":
            assert args[1] in ("check", "stats")
        for option in [a.split("=", 1)[0] for a in args if a.startswith("--")]:
            assert known_option(command, option), f"pandallm {' '.join(command)} has no option {option}"
    elif program == "pip":
        for extra in re.findall(r"\.\[(\w+)\]", " ".join(args)):
            assert f"\n{extra} = " in (REPO / "pyproject.toml").read_text(), f"no extra [{extra}]"
        pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
        for version in re.findall(r"torch==(\S+)", " ".join(args)):
            assert pinned and version == pinned.group(1), "the torch the README installs is the one constraints pins"
        if "-c" in args:
            assert (REPO / args[args.index("-c") + 1]).is_file()
    elif program in ("python", "python3") and args[0] == "-m":
        assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
    elif program in ("bash", "sbatch"):
        assert any(a.endswith((".sh", ".sbatch")) for a in args)
    elif program == "nox":
        assert re.search(rf"^def {args[args.index('-s') + 1]}\(", (REPO / "noxfile.py").read_text(), re.M)


def test_every_config_in_the_readme_parses(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for block in code_blocks("yaml"):
        if block.lstrip().startswith(("-", "#")):  # a sweep file: a list of dotted keys of `pandallm fit`
            for key in re.findall(r"^[-\s]+([\w.]+):", block, re.M):
                assert known_option(("fit",), f"--{key}"), key
            continue
        piece = tmp_path / "piece.yaml"
        piece.write_text(block)
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", "recipes/tiny.yaml", "--config", str(piece), "--print_config"])
        assert exit_.value.code in (0, None), block


def test_the_figures_quoted_of_the_demo_are_the_demos(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    main(["fit", "--config", "recipes/tiny.yaml", "--dry_run", f"--data.cache_dir={tmp_path}"])
    captured = capsys.readouterr()
    shown = captured.out
    # What the run says the data became, as quoted (the cache entry's directory aside).
    (summary,) = [b for b in code_blocks() if b.startswith("pandallm data: tokenized data in")]
    for line in summary.splitlines()[1:]:
        assert line in captured.err.splitlines(), line  # placeholders or stale figures fail here
    (quoted,) = [b for b in code_blocks() if b.startswith("pandallm fit --dry_run:")]
    assert quoted.strip() == shown.strip()  # steps, tokens per step, parameters, memory
    steps, per_epoch = map(int, re.search(r"optimizer steps: (\d+); (\d+) per epoch", shown).groups())
    parameters = int(re.search(r"parameters: ([\d,]+),", shown).group(1).replace(",", ""))
    assert f"a {parameters / 1e6:.1f}M-parameter LLaMA" in README
    assert f"{steps // per_epoch} epochs of {per_epoch} optimizer steps" in README
    # The best checkpoint of the demo, as the README names it: its last epoch, at its last step.
    for epoch, step in re.findall(r"runs/tiny/checkpoints/epoch=(\d+)-step=(\d+)\.ckpt", README):
        assert (int(epoch), int(step)) == (steps // per_epoch - 1, steps)
