"""Noise schedules, timestep respacing and the discrete Gaussian process they define.

The maths is that of DDPM (Ho et al. 2020) with the cosine schedule, learned-range variance and
respacing of Improved DDPM (Nichol & Dhariwal 2021), as used by GLIDE (Nichol et al. 2021).
Every table is float64 numpy, as in the reference; values gathered for a batch are cast to
float32 on the batch's device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MAX_BETA = 0.999  # cosine-schedule cap (Improved DDPM §3.2)

_SPEC_HELP = (
    "allowed respacing specs: an int N or a digit string 'N' (N evenly spaced steps), "
    "comma-separated section counts 'a,b,c' (each section of the schedule gets that many "
    "evenly spaced steps), 'ddimN' (N steps at one uniform stride from 0), 'fast27', "
    "or '' (keep every timestep)"
)


def _take(table: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`table[index]` gathered in float64, cast to float32 on `like`'s device and shaped
    [B, 1, ..., 1] so that it broadcasts against `like`."""
    values = torch.as_tensor(table[index.detach().cpu().numpy()], dtype=torch.float32)
    return values.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- schedules


def _cosine_betas(num_timesteps: int) -> np.ndarray:
    """Improved DDPM eq. 17: abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2 with s = 0.008,
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)."""
    alpha_bar = np.array(
        [math.cos((i / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_timesteps + 1)]
    )
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)


def _linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule 1e-4 .. 0.02, rescaled so any T matches T=1000."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


_BETA_SCHEDULES = {"squaredcos_cap_v2": _cosine_betas, "linear": _linear_betas}


@dataclass(eq=False)
class Schedule:
    """A named beta schedule over `num_timesteps` original timesteps.

    `q_sample`, `predict_x0` and `eps_from_x0` take `t` as a LongTensor [B] of original
    timestep indices and compute in float32 on the input's device.
    """

    name: str
    betas: np.ndarray  # float64 [T]

    def __post_init__(self) -> None:
        self.betas = np.asarray(self.betas, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4)."""
        abar = self.alphas_cumprod
        return _take(np.sqrt(abar), t, x0) * x0 + _take(np.sqrt(1.0 - abar), t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM eq. 4 solved for x_0)."""
        abar = self.alphas_cumprod
        return _take(np.sqrt(1.0 / abar), t, x_t) * x_t - _take(np.sqrt(1.0 / abar - 1.0), t, x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that `predict_x0` maps to `x0`."""
        abar = self.alphas_cumprod
        return (_take(np.sqrt(1.0 / abar), t, x_t) * x_t - x0) / _take(np.sqrt(1.0 / abar - 1.0), t, x_t)

    def spaced(self, timesteps: Sequence[int] | None = None) -> "SpacedProcess":
        """The process restricted to the kept original `timesteps` (ascending; all if None)."""
        kept = np.arange(self.num_timesteps) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        if kept.ndim != 1 or len(kept) == 0:
            raise ValueError("timesteps must be a non-empty 1-D list of original timestep indices")
        if np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(
                f"timesteps must be strictly ascending original indices in [0, {self.num_timesteps}), "
                f"got {kept.tolist()}"
            )
        return SpacedProcess(timesteps=kept, alphas_cumprod=self.alphas_cumprod[kept])


def make_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """The reference's `get_named_beta_schedule`: "squaredcos_cap_v2" (GLIDE base) or "linear"
    (GLIDE upsampler)."""
    if name not in _BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(_BETA_SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    return Schedule(name=name, betas=_BETA_SCHEDULES[name](num_timesteps))


# --------------------------------------------------------------------------- respaced process


@dataclass(frozen=True, eq=False)
class SpacedProcess:
    """The diffusion restricted to kept timesteps (Improved DDPM §4, "SpacedDiffusion").

    Arrays are float64 and indexed by the position k of a kept timestep (ascending), not by
    the original timestep. Between consecutive kept timesteps the process has betas
    1 - abar_k / abar_{k-1}, with abar_{-1} = 1; everything else (posterior, variance range)
    follows from those exactly as for an ordinary DDPM.
    """

    timesteps: np.ndarray  # int64 [n], original indices
    alphas_cumprod: np.ndarray  # float64 [n], abar at the kept timesteps

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def betas(self) -> np.ndarray:
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def posterior_variance(self) -> np.ndarray:
        """beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k) (DDPM eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log beta~_k, with the k=0 entry (variance 0) replaced by the k=1 one as the reference does."""
        variance = self.posterior_variance
        variance[0] = variance[1] if len(variance) > 1 else self.betas[0]
        return np.log(variance)

    def posterior_mean(self, k: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """mu~(x_t, x_0) of q(x_{k-1} | x_k, x_0) (DDPM eq. 7)."""
        abar, abar_prev, betas = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        return _take(coef_x0, k, x_t) * x0 + _take(coef_xt, k, x_t) * x_t

    def posterior_log_variance(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Clipped log beta~_k, shaped to broadcast against `like`."""
        return _take(self.posterior_log_variance_clipped, k, like)

    def learned_log_variance(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Improved DDPM eq. 15: log Sigma = frac log beta_k + (1 - frac) log beta~_k, frac = (v+1)/2."""
        frac = (v + 1.0) / 2.0
        max_log = _take(np.log(self.betas), k, v)
        return frac * max_log + (1.0 - frac) * self.posterior_log_variance(k, v)


def split_model_output(output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a raw model output into (eps, v): `channels` eps channels, then optionally as many
    learned-range variance channels (None when the model predicts eps only)."""
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise ValueError(
        f"model output has {output.shape[1]} channels; expected {channels} (eps) or {2 * channels} (eps, v)"
    )


# --------------------------------------------------------------------------- respacing


def _evenly_spaced_sections(num_timesteps: int, section_counts: list[int]) -> set[int]:
    """Split [0, T) into len(section_counts) near-equal sections and keep section_counts[i]
    evenly spaced steps (first and last included) from section i, rounding with Python round()
    on an accumulated float stride exactly as the reference's `space_timesteps`."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"cannot take {count} steps from a section of {size} timesteps "
                f"(a section count may not exceed its section's size)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


def _uniform_stride(num_timesteps: int, count: int) -> set[int]:
    """'ddimN': the smallest stride s with len(range(0, T, s)) == N (the reference's DDIM spacing)."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"'ddim{count}' is not possible: no stride s in [1, {num_timesteps}) gives "
        f"len(range(0, {num_timesteps}, s)) == {count}"
    )


def respace(num_timesteps: int, spec: int | str) -> list[int]:
    """Original timesteps kept by a respacing spec, ascending (Improved DDPM §4 strided sampling).

    Matches the reference's `space_timesteps`, including its "fast27" special case
    ("10,10,3,2,2" with T-1 replaced by T-3). See `_SPEC_HELP` for the accepted specs.
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ValueError(f"bad respacing spec {spec!r}; {_SPEC_HELP}")
    text = str(spec).strip()
    if text == "":
        kept = set(range(num_timesteps))
    elif text == "fast27":
        kept = set(respace(num_timesteps, "10,10,3,2,2"))
        kept.remove(num_timesteps - 1)
        kept.add(num_timesteps - 3)
    elif re.fullmatch(r"ddim[0-9]+", text):
        kept = _uniform_stride(num_timesteps, int(text[len("ddim"):]))
    elif re.fullmatch(r"[0-9]+(,[0-9]+)*", text):
        kept = _evenly_spaced_sections(num_timesteps, [int(part) for part in text.split(",")])
    else:
        raise ValueError(f"bad respacing spec {spec!r}; {_SPEC_HELP}")
    if not kept:
        raise ValueError(f"respacing spec {spec!r} keeps no timesteps; {_SPEC_HELP}")
    return sorted(kept)
