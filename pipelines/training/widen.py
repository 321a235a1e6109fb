"""Widen a trained model for inpainting (GLIDE §4.3): four new input channels initialised to zero.

The first convolution takes [x (3) | masked image (3) | mask (1)] (+ [upsampled low-res (3)] for an
upsampler), in the order `GlideUNet.forward` concatenates them. Every weight is copied; the new
input columns are zero, so the widened model computes what the old one did whatever the
inpainting inputs are (bit-for-bit on CPU for a base model, see tests/test_training.py).

`add_attention_positions` grows a trained model the same way: its attention blocks get their
zero-initialised position projections (GlideConfig.attention_pos_emb), so it computes what it did.
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.glide import GlideUNet

FIRST_CONV = "input_blocks.0.0.weight"


def widen_first_conv(weight: torch.Tensor, config) -> torch.Tensor:
    """A plain model's first-conv weight (C, 3 [+3 low-res], k, k) laid out for the widened `config`,
    with zero columns for the masked image and the mask."""
    new = torch.zeros(weight.shape[0], config.in_channels, *weight.shape[2:], dtype=weight.dtype,
                      device=weight.device)
    new[:, :3] = weight[:, :3]  # the noisy image x keeps its columns
    if config.super_res:
        new[:, 7:] = weight[:, 3:]  # low-res columns move behind the 4 new ones (forward's order)
    return new


def widen_for_inpainting(model: GlideUNet) -> GlideUNet:
    """A new GlideUNet with `inpaint=True`: 3 -> 7 input channels (6 -> 10 for an upsampler)."""
    if model.config.inpaint:
        raise ValueError("this model already has inpainting inputs; fine-tune it directly (no widening needed)")
    config = dataclasses.replace(model.config, inpaint=True)
    with torch.device("meta"):
        wide = GlideUNet(config)
    wide = wide.to_empty(device=model.device).to(model.dtype)
    state = model.state_dict()
    state[FIRST_CONV] = widen_first_conv(state[FIRST_CONV], config)
    wide.load_state_dict(state, strict=True)
    if hasattr(model, "info"):
        wide.info = model.info
    return wide.train(model.training)


def add_attention_positions(model: GlideUNet) -> GlideUNet:
    """A new GlideUNet with `attention_pos_emb=True`: every weight copied, the position projections zero."""
    if model.config.attention_pos_emb:
        return model
    config = dataclasses.replace(model.config, attention_pos_emb=True)
    grown = GlideUNet(config).to(device=model.device, dtype=model.dtype)  # pos_proj starts at zero
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".pos_proj." in k for k in missing), (missing, unexpected)
    if hasattr(model, "info"):
        grown.info = model.info
    return grown.train(model.training)
