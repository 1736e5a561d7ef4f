"""miniplm: knowledge distillation for LM pre-training by Difference Sampling."""

__version__ = "0.1.0"
