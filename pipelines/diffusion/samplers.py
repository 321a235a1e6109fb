"""Samplers for eps-prediction diffusion models, all behind one function, `sample`.

A step is three moves: predict x_0 (with `denoised_fn`, then clipping), update x towards the
next smaller kept timestep, report to `callback` (which may replace x). Steps run over any
ascending list of kept original timesteps (see `respace`); the model always sees original
timestep indices.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .schedule import Schedule, SpacedProcess, split_model_output

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], "torch.Tensor | None"]
# predict(x, k) -> (x0, v): the processed x_0 prediction and the variance channels (or None)
Predictor = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so a CPU generator
    gives the same numbers for any device) and moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def _per_row(index: int, x: torch.Tensor) -> torch.Tensor:
    """`index` repeated for every row of x, as a LongTensor [B]."""
    return torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


def _make_predictor(
    model_fn: ModelFn,
    schedule: Schedule,
    process: SpacedProcess,
    clip_denoised: bool,
    denoised_fn: DenoisedFn | None,
) -> Predictor:
    """x_0 from the model's eps at kept position k; `denoised_fn` then the [-1, 1] clamp, in the
    reference's order."""

    def predict(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = _per_row(int(process.timesteps[k]), x)
        eps, v = split_model_output(model_fn(x, t).float(), x.shape[1])
        x0 = schedule.predict_x0(x, t, eps)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, v

    return predict


def _report(
    callback: Callback | None, process: SpacedProcess, k: int, x: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """Call `callback` for the step taken at kept position k; return x or its replacement."""
    if callback is None:
        return x
    n = len(process)
    info = {
        "i": n - 1 - k,
        "n": n,
        "t": int(process.timesteps[k]),
        "t_next": int(process.timesteps[k - 1]) if k > 0 else -1,
        "x": x,
        "denoised": x0,
    }
    replacement = callback(info)
    return x if replacement is None else replacement


# update(k, x, x0, v) -> the new x: one sampler's step from kept position k to k - 1 (to x_0 at k = 0)
Update = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _run_steps(
    predict: Predictor, x: torch.Tensor, process: SpacedProcess, callback: Callback | None, update: Update
) -> torch.Tensor:
    """The loop every sampler shares: from the largest kept position down, predict x_0, update x
    with the sampler's rule, report to `callback` (which may replace x)."""
    for k in reversed(range(len(process))):
        x0, v = predict(x, k)
        x = update(k, x, x0, v)
        x = _report(callback, process, k, x, x0)
    return x


def _sample_ddpm(
    predict: Predictor, x: torch.Tensor, process: SpacedProcess,
    generator: torch.Generator | None, callback: Callback | None,
) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) with the learned-range variance of Improved DDPM
    eq. 15, or the posterior variance beta~ when the model has no variance channels."""

    def update(k, x, x0, v):
        kept = _per_row(k, x)
        mean = process.posterior_mean(kept, x0, x)
        if k == 0:
            return mean  # no noise at the last step
        log_variance = process.posterior_log_variance(kept, x) if v is None else process.learned_log_variance(kept, v)
        return mean + torch.exp(0.5 * log_variance) * _randn_like(x, generator)

    return _run_steps(predict, x, process, callback, update)


def _sample_ddim(
    predict: Predictor, x: torch.Tensor, process: SpacedProcess,
    generator: torch.Generator | None, callback: Callback | None,
) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2020, eq. 12): the clipped x_0 is kept and eps is re-derived
    from it; abar_prev = 1 at the last step, which then returns x_0."""
    abar_prev = process.alphas_cumprod_prev
    abar = process.alphas_cumprod

    def update(k, x, x0, _v):
        eps = (x - math.sqrt(abar[k]) * x0) / math.sqrt(1.0 - abar[k])
        return math.sqrt(abar_prev[k]) * x0 + math.sqrt(1.0 - abar_prev[k]) * eps

    return _run_steps(predict, x, process, callback, update)


def _sample_dpmpp_2m(
    predict: Predictor, x: torch.Tensor, process: SpacedProcess,
    generator: torch.Generator | None, callback: Callback | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order in the data
    prediction, in the log-SNR lambda = log(alpha / sigma) of the kept timesteps. First order on
    the first step (no previous x_0 yet) and on the final update into the smallest kept timestep
    ("lower order final"): extrapolating across that large log-SNR jump amplifies errors. The
    last step returns the x_0 prediction at the smallest kept timestep."""
    alpha = [math.sqrt(a) for a in process.alphas_cumprod]
    sigma = [math.sqrt(1.0 - a) for a in process.alphas_cumprod]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    previous_x0, previous_h = None, None

    def update(k, x, x0, _v):
        nonlocal previous_x0, previous_h
        if k == 0:
            return x0
        h = lam[k - 1] - lam[k]
        if previous_x0 is None or k == 1:
            d = x0  # D_1, and the first-order final update
        else:
            r = previous_h / h
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * previous_x0  # D_i
        previous_x0, previous_h = x0, h
        return (sigma[k - 1] / sigma[k]) * x - alpha[k - 1] * math.expm1(-h) * d

    return _run_steps(predict, x, process, callback, update)


_SAMPLERS = {"ddpm": _sample_ddpm, "ddim": _sample_ddim, "dpm++": _sample_dpmpp_2m}


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    *,
    schedule: Schedule,
    timesteps: Sequence[int],
    method: str = "ddpm",
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise` (x at timesteps[-1]) down to x_0.

    model_fn(x, t): t is a LongTensor [B] of original timesteps; returns eps (x's channel count)
        and optionally as many learned-range variance channels. Any float dtype; maths is float32.
    timesteps: ascending kept original timesteps, e.g. `respace(T, "100")` or a prefix of it
        (SDEdit: pass noise = q_sample(image, timesteps[-1])).
    method: "ddpm" (ancestral, uses `generator`), "ddim" (eta 0) or "dpm++" (DPM-Solver++(2M)).
    denoised_fn(x0) -> x0: applied to every x_0 prediction before clipping (inpainting uses it
        to force the known pixels).
    callback(info): called after every step with "i" (0..n-1), "n", "t" (original timestep the
        model saw), "t_next" (original timestep of the new x; -1 once x is the final x_0),
        "x" (after the update) and "denoised" (the x_0 prediction). A returned tensor replaces x.
    """
    if method not in _SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {sorted(_SAMPLERS)}")
    process = schedule.spaced(timesteps)
    predict = _make_predictor(model_fn, schedule, process, clip_denoised, denoised_fn)
    return _SAMPLERS[method](predict, noise.float(), process, generator, callback)
