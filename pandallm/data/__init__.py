from pandallm.data.datamodule import PandaDataModule

__all__ = ["PandaDataModule"]
