"""Widen a trained model for inpainting (GLIDE §4.3): four new input channels initialised to zero.

The first convolution takes [x (3) | masked image (3) | mask (1)] (+ [upsampled low-res (3)] for an
upsampler), in the order `GlideUNet.forward` concatenates them. Every weight is copied; the new
input columns are zero, so the widened model computes what the old one did whatever the
inpainting inputs are (bit-for-bit on CPU for a base model, see tests/test_training.py).
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.glide import GlideUNet

FIRST_CONV = "input_blocks.0.0.weight"


def widen_for_inpainting(model: GlideUNet) -> GlideUNet:
    """A new GlideUNet with `inpaint=True`: 3 -> 7 input channels (6 -> 10 for an upsampler)."""
    if model.config.inpaint:
        raise ValueError("this model already has inpainting inputs; fine-tune it directly (no widening needed)")
    config = dataclasses.replace(model.config, inpaint=True)
    with torch.device("meta"):
        wide = GlideUNet(config)
    wide = wide.to_empty(device=model.device).to(model.dtype)
    state = model.state_dict()
    old = state[FIRST_CONV]  # (C, 3 [+3 low-res], 3, 3)
    new = torch.zeros(old.shape[0], config.in_channels, *old.shape[2:], dtype=old.dtype, device=old.device)
    new[:, :3] = old[:, :3]  # the noisy image x keeps its columns
    if config.super_res:
        new[:, 7:] = old[:, 3:]  # low-res columns move behind the 4 new ones (forward's order)
    state = dict(state, **{FIRST_CONV: new})
    wide.load_state_dict(state, strict=True)
    if hasattr(model, "info"):
        wide.info = model.info
    return wide.train(model.training)
