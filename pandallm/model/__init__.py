from pandallm.model.module import PandaLLM

__all__ = ["PandaLLM"]
