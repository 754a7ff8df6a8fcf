"""The model side: `PandaLLM` (pandallm.model.module) and what builds, adapts, shards and exports it.

`PandaLLM` is imported on first use: its module imports the objectives, whose files import pieces of this package
(`pandallm.model.loss`), so an eager import here made `import pandallm.objectives` in a fresh process circular.
"""

from typing import Any

__all__ = ["PandaLLM"]


def __getattr__(name: str) -> Any:
    if name == "PandaLLM":
        from pandallm.model.module import PandaLLM

        return PandaLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
