"""Diffusion core: schedules and respacing, samplers, classifier-free guidance, training loss."""

from .guidance import classifier_free_guidance
from .losses import grounding_loss, training_losses
from .samplers import sample
from .schedule import Schedule, make_schedule, respace

__all__ = ["Schedule", "classifier_free_guidance", "grounding_loss", "make_schedule", "respace", "sample", "training_losses"]
