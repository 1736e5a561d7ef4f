"""The FLOP counts every report uses, as the paper counts them (N parameters, D tokens); exact integers."""

from __future__ import annotations


def forward_flops(parameters: int, tokens: int) -> int:
    """2 N D: one forward pass (scoring, generation, an online teacher)."""
    return 2 * parameters * tokens


def training_flops(parameters: int, tokens: int, teacher_parameters: int = 0) -> int:
    """6 N D for the student's forward and backward, plus 2 N_teacher D for an online teacher's forward."""
    return 6 * parameters * tokens + forward_flops(teacher_parameters, tokens)
