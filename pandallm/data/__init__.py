from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pandallm.data.datamodule import PandaDataModule

__all__ = ["PandaDataModule"]


def __getattr__(name: str):
    # Imported when asked for: a data-loader worker unpickles functions of `pandallm.data.collate` and
    # `pandallm.data.streaming`, which must not import the data module, Lightning with it (`pandallm.data.workers`).
    if name == "PandaDataModule":
        from pandallm.data.datamodule import PandaDataModule

        return PandaDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
