"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench`, `nox -s bench_gpu`,
`nox -s latest`, `nox -s lock`.

Most sessions reuse the current interpreter's packages (`python=False`), so that the CPU build of torch installed per
the README is the one tested; a fresh virtualenv would resolve `torch` from the index to the CUDA build. `latest`
makes its own virtualenv, on purpose.
"""

import os
import re
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python=False)
def tests_all(session: nox.Session) -> None:
    """Every test, the slow ones (left out of the default run) included."""
    session.run("python", "-m", "pytest", "-n", "2", "-m", "slow or not slow", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "pandallm", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "pandallm", "tests", "benchmarks", "noxfile.py")


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    session.run("pandallm", "fit", "--config", "recipes/tiny.yaml")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The CPU benchmarks; each prints a table and writes benchmarks/results/<name>.json. The GPU benchmark runs
    too where CUDA is available (else `nox -s bench_gpu` says why not)."""
    session.run("python", "-m", "benchmarks.vs_hf_trainer", *session.posargs)
    session.run("python", "-m", "benchmarks.data_pipeline")
    session.run("python", "-m", "benchmarks.overhead")
    import torch

    if torch.cuda.is_available():
        session.run("python", "-m", "benchmarks.gpu")


@nox.session(python=False)
def bench_gpu(session: nox.Session) -> None:
    """1B MFU and 7B LoRA / QLoRA against the HF Trainer on one GPU; `-- --dry-run` checks it on the CPU."""
    session.run("python", "-m", "benchmarks.gpu", *session.posargs)


def _locked(name: str) -> str:
    """`name==version` as constraints.txt pins it."""
    found = re.search(rf"^{re.escape(name)}==\S+$", Path("constraints.txt").read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"constraints.txt pins no {name}")
    return found.group(0)


@nox.session(venv_backend="venv")
def latest(session: nox.Session) -> None:
    """The suite against the newest releases pyproject.toml's ranges admit, in a fresh virtualenv; it prints which
    packages differ from constraints.txt, so that an upstream change shows up here as a named failure rather than as
    a broken fresh clone. torch stays at the locked CPU build (the CUDA build is several GB): set TORCH_INDEX_URL to
    PyTorch's CPU index (https://download.pytorch.org/whl/cpu) where pip's index is public PyPI."""
    index = os.environ.get("TORCH_INDEX_URL")
    torch = Path(session.create_tmp()) / "torch.txt"
    torch.write_text(_locked("torch") + "\n")
    session.install("-c", str(torch), "torch", *(["--index-url", index] if index else []))
    session.install("-c", str(torch), "--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]")
    session.run("python", ".ci/lock.py", "--compare")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python=False)
def lock(session: nox.Session) -> None:
    """Pin the versions installed here into constraints.txt; run it after the suite passed (`nox -s tests`)."""
    session.run("python", ".ci/lock.py")
