"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench`, `nox -s bench_gpu`.

Sessions reuse the current interpreter's packages (`python=False`), so that the CPU build of torch installed per
the README is the one tested; a fresh virtualenv would resolve `torch` from the index to the CUDA build.
"""

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
