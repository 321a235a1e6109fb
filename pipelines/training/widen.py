"""Widen a trained model for inpainting (GLIDE §4.3): four new input channels initialised to zero.

The first convolution takes [x (3) | masked image (3) | mask (1)] (+ [upsampled low-res (3)] for an
upsampler), in the order `GlideUNet.forward` concatenates them. Every weight is copied; the new
input columns are zero, so the widened model computes what the old one did whatever the
inpainting inputs are (bit-for-bit on CPU for a base model, see tests/test_training.py).

`grow_zero_initialised_parts` grows a trained model the same way: the parts that start at zero
(GlideConfig.attention_pos_emb's position projections, text_layout's layout map) are added, so it
computes what it did.
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


# config changes a trained model can take: each only adds parameters whose output starts at zero
GROWABLE = {"attention_pos_emb": lambda old, new: new is True,
            "text_layout": lambda old, new: old == 0 and isinstance(new, int) and new > 0}
GROWN_KEYS = (".pos_proj.", "layout_from_text.", "layout_proj.")


def grow_zero_initialised_parts(model: GlideUNet, changes: dict) -> GlideUNet:
    """A new GlideUNet with the `changes` (keys of GROWABLE) applied: every weight copied, the new parts
    starting where their output is zero."""
    refused = sorted(k for k, v in changes.items() if k not in GROWABLE or not GROWABLE[k](getattr(model.config, k), v))
    if refused:
        raise ValueError(f"a trained model cannot take {', '.join(f'{k}={changes[k]!r}' for k in refused)}")
    config = dataclasses.replace(model.config, **changes)
    grown = GlideUNet(config).to(device=model.device, dtype=model.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(any(g in k for g in GROWN_KEYS) for k in missing), (missing, unexpected)
    if hasattr(model, "info"):
        grown.info = model.info
    return grown.train(model.training)
