"""Training objective: Improved DDPM's L_hybrid = L_simple + L_vlb (Nichol & Dhariwal 2021 §3.1)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import Schedule, SpacedProcess, _take, split_model_output

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BIN_HALF_WIDTH = 1.0 / 255.0  # pixels in [-1, 1] on the 8-bit grid


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def _normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 8-bit grid of [-1, 1] under N(mean, e^(2 log_scale)) integrated over
    x's bin, the outer bins extending to -inf / +inf (DDPM §3.3 decoder). Uses the exact normal
    CDF (the reference uses a tanh approximation of it)."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + _BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - _BIN_HALF_WIDTH)
    log_below_upper = torch.special.log_ndtr(upper)
    log_above_lower = torch.special.log_ndtr(-lower)
    log_in_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))


def _vlb_bits(
    schedule: Schedule,
    process: SpacedProcess,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Per-example VLB term in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0
    and the decoder NLL -log p(x_0 | x_1) at t = 0 (DDPM eq. 5). The model mean comes from the
    unclipped x_0 of `eps`; pass it detached so that only the variance learns from this term."""
    model_mean = process.posterior_mean(t, schedule.predict_x0(x_t, t, eps), x_t)
    model_log_var = process.learned_log_variance(t, v)
    true_mean = process.posterior_mean(t, x0, x_t)
    true_log_var = process.posterior_log_variance(t, x_t)
    kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder_nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)


def training_losses(
    model_fn: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    high_noise_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Improved DDPM L_hybrid for a batch: returns per-example [B] tensors
    "mse" (L_simple, DDPM eq. 14), "vb" (L_vlb term with a stop-gradient on the mean, scaled by
    T/1000 as improved-diffusion does; 0 when the model outputs eps only) and "loss" = mse + vb.

    x0: clean images in [-1, 1]; t: LongTensor [B] of timesteps of the full (non-respaced)
    schedule; noise defaults to standard normal noise drawn from `generator` on x0's device.
    high_noise_weight > 1 weights "mse" in "loss" by min(1 / abar_t, high_noise_weight): the v-prediction
    loss up to that cap (training's --high-noise-weight); "mse" itself stays L_simple.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    x0 = x0.float()
    x_t = schedule.q_sample(x0, t, noise)
    eps, v = split_model_output(model_fn(x_t, t).float(), x0.shape[1])
    mse = _mean_flat((noise - eps) ** 2)
    if v is None:
        vb = torch.zeros_like(mse)
    else:
        vb = _vlb_bits(schedule, schedule.spaced(), x0, x_t, t, eps.detach(), v) * (schedule.num_timesteps / 1000.0)
    if high_noise_weight > 1.0:
        weight = _take(np.minimum(1.0 / schedule.alphas_cumprod, high_noise_weight), t, mse)
        return {"loss": weight * mse + vb, "mse": mse, "vb": vb}
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def grounding_loss(text_attention: list[torch.Tensor], token_objects: torch.Tensor,
                   object_masks: torch.Tensor) -> torch.Tensor:
    """Token-level grounding loss (TokenCompose, Wang et al. 2024), per example [B]: over the tokens whose
    word names an object, the mean share of the token's attention that falls outside that object,
    1 - sum_p A(p) M(p) / sum_p A(p), averaged over attention layers; 0 for an example without such tokens.

    text_attention: per layer (B, tokens, H, W) weights; token_objects: (B, tokens) object index or -1;
    object_masks: (B, objects, S, S) coverage in [0, 1], area-averaged to each layer's H x W.
    """
    named = (token_objects >= 0).float()
    index = token_objects.clamp(min=0)
    per_layer, resized = [], {}
    for weights in text_attention:
        hw = weights.shape[-2:]
        if hw not in resized:
            masks = object_masks.float()
            if masks.shape[-2:] != hw:
                masks = F.interpolate(masks, hw, mode="area")
            resized[hw] = torch.gather(masks, 1, index[..., None, None].expand(-1, -1, *hw))  # (B, tokens, H, W)
        weights = weights.float()
        inside = (weights * resized[hw]).sum((-2, -1)) / weights.sum((-2, -1)).clamp(min=1e-8)
        per_layer.append(((1 - inside) * named).sum(1) / named.sum(1).clamp(min=1))
    return torch.stack(per_layer).mean(0)
