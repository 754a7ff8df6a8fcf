"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`.

Sessions reuse the current interpreter's packages (`python=False`), so that the CPU build of torch installed per
the README is the one tested; a fresh virtualenv would resolve `torch` from the index to the CUDA build.
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "pandallm", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "pandallm", "tests", "benchmarks", "noxfile.py")


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    session.run("pandallm", "fit", "--config", "recipes/tiny.yaml")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The CPU benchmarks; each prints a table and writes benchmarks/results/<name>.json."""
    session.run("python", "-m", "benchmarks.vs_hf_trainer", *session.posargs)
    session.run("python", "-m", "benchmarks.data_pipeline")
    session.run("python", "-m", "benchmarks.overhead")
