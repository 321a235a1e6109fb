"""Shared plumbing of the editing pipelines: one copy of each helper.

Read top to bottom:
  errors → model resolution and the shared ModelStore → seeds and step specs → prompt encoding
  → image/mask conversion and the "only masked" crop-and-paste → the denoising engine
  (one function for every stage of every pipeline) → PipelineOutput → BasePipeline.

Conventions
  * Images enter as PIL / path / bytes / numpy and are read once with `io.load_image` as 8-bit RGB
    (RGBA is composited on white, P/L/16-bit are converted). Outputs are RGB PIL images.
  * `mask_image` follows diffusers (white = regenerate, threshold >= 128). It is converted ONCE,
    in `MaskedCrop`, to GLIDE's convention (1 = known/keep) at the model's working resolution.
  * Pixels in [-1, 1] float32; uint8 <-> [-1, 1] is x / 127.5 - 1 and ((x + 1) * 127.5).round().
  * Every random draw comes from one CPU `torch.Generator` (seeded from `seed`), in a fixed order,
    so the same call gives the same pixels on the same device. CPU kernels also depend on the
    thread count, so `params` records `num_threads` and a replay runs with it (`reproducible`).
  * `callback_on_step_end(step, num_steps, preview)` is called after every step of every stage
    (step 0-based, num_steps = all stages of the call, preview = the x_0 prediction (B,3,S,S) in
    [-1, 1]; `tensor_to_pil` converts it); `pipe.interrupt()` makes the call raise
    GenerationInterrupted at the next step. NaN/Inf model output raises NonFiniteOutputError.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from .checkpoints import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_model, parse_device, read_model_config
# the defaults live in .defaults (torch-free, for the studio); re-exported here for pipeline code
from .defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INPAINT, DEFAULT_SAMPLER, DEFAULT_STEPS,  # noqa: F401
                       DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_SAMPLER_INPAINT, DEFAULT_UPSAMPLE_STEPS,
                       DEFAULT_UPSAMPLE_TEMPERATURE, SAMPLERS)
from .diffusion import classifier_free_guidance, make_schedule, respace, sample
from .io import load_image, load_mask_image
from .tokenizer import TokenBatch

NUM_TIMESTEPS = 1000  # every GLIDE-family model here is trained on a 1000-step process
MAX_IMAGES = 16  # per call; a bigger batch is a mistake more often than a wish

# callback_on_step_end(step, num_steps, preview): step is 0-based over all stages of the call,
# preview the current x_0 prediction (B, 3, S, S) in [-1, 1] (`tensor_to_pil` turns it into images).
StepCallback = Callable[[int, int, torch.Tensor], object]


# -----------------------------------------------------------------------------
# Errors


class PipelineInputError(ValueError):
    """A pipeline argument cannot be used; the message names the problem and what to do."""


class EmptyMaskError(PipelineInputError):
    """The mask has no white pixel: there is nothing to regenerate."""


class NonFiniteOutputError(ValueError):
    """The model produced NaN or Inf; the message names the step."""


class GenerationInterrupted(Exception):
    """Raised inside a pipeline call after `pipe.interrupt()`; nothing is returned or recorded."""


# -----------------------------------------------------------------------------
# Model resolution and the shared store

ROLES = ("base", "base-inpaint", "upsampler", "upsampler-inpaint")
# names of the released GLIDE files, found beside each other
RELEASED_FILES = {"base.pt": "base", "base_inpaint.pt": "base-inpaint",
                  "upsample.pt": "upsampler", "upsample_inpaint.pt": "upsampler-inpaint"}


def default_models_dir() -> Path:
    """`assets/models` at the repository root; the env var STUDIO_MODELS_DIR overrides it."""
    env = os.environ.get("STUDIO_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "assets" / "models"


def _role_of_config(inpaint: bool, super_res: bool) -> str:
    return {(False, False): "base", (True, False): "base-inpaint",
            (False, True): "upsampler", (True, True): "upsampler-inpaint"}[(bool(inpaint), bool(super_res))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelStore:
    """Finds the models under one path and loads each lazily, once, for every pipeline using it.

    `path` may be a models directory (subfolders base/, base-inpaint/, upsampler/,
    upsampler-inpaint/, any may be missing), a single model folder (its role comes from its
    config), a released GLIDE .pt file (siblings base.pt, upsample.pt, base_inpaint.pt,
    upsample_inpaint.pt are picked up by name) or a folder holding those .pt files.
    `ModelStore.shared(path, device, dtype)` returns the one live store for that key, so pipelines
    made with `from_pretrained` from the same path share model instances.
    """

    _registry: "weakref.WeakValueDictionary[tuple, ModelStore]" = weakref.WeakValueDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, path=None, device=None, dtype=None):
        self.path = Path(path) if path is not None else default_models_dir()
        self.device = parse_device(device) if device is not None else None
        self.dtype = _parse_dtype(dtype)
        self._files: dict[str, Path] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._ids: dict[str, str] = {}
        self._lock = threading.RLock()
        self._scan()

    @classmethod
    def shared(cls, path=None, device=None, dtype=None) -> "ModelStore":
        path = Path(path) if path is not None else default_models_dir()
        key = (str(path.resolve()), str(device), str(_parse_dtype(dtype)))
        with cls._registry_lock:
            store = cls._registry.get(key)
            if store is None:
                store = cls(path, device, dtype)
                cls._registry[key] = store
            return store

    # -- discovery (no weights are read here) --------------------------------------------------

    def _scan(self) -> None:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"no models at {p}: give a models folder (with base/, base-inpaint/, "
                                  "upsampler/), a model folder, or a released GLIDE .pt file"
                                  + ("" if os.environ.get("STUDIO_MODELS_DIR") else
                                     "; STUDIO_MODELS_DIR overrides the default location"))
        if p.is_file():
            if p.suffix == ".safetensors":
                self._add_folder(p.parent)
            else:
                if p.name not in RELEASED_FILES:  # the file the user named wins over its siblings
                    self._add_unusually_named(p)
                self._add_released_dir(p.parent)
            return
        if (p / CONFIG_FILE).is_file():
            self._add_folder(p)
            return
        for role in ROLES:
            sub = p / role
            if (sub / CONFIG_FILE).is_file():
                self._files[role] = sub
        self._add_released_dir(p)

    def _add_folder(self, folder: Path) -> None:
        cfg = read_model_config(folder).get("config", {})
        self._files[_role_of_config(cfg.get("inpaint", False), cfg.get("super_res", False))] = folder

    def _add_released_dir(self, folder: Path) -> None:
        for name, role in RELEASED_FILES.items():
            if (folder / name).is_file() and role not in self._files:
                self._files[role] = folder / name

    def _add_unusually_named(self, path: Path) -> None:
        # a released file with an unusual name: its variant is only known once loaded, so load it now
        model = load_model(path, device=self.device, dtype=self.dtype)
        role = _role_of_config(model.config.inpaint, model.config.super_res)
        self._files[role], self._models[role] = path, model

    def has(self, role: str) -> bool:
        return role in self._files

    def first_available(self, *roles: str) -> str | None:
        return next((r for r in roles if self.has(r)), None)

    def require(self, *roles: str) -> str:
        """The first of `roles` that exists; CheckpointError naming what is missing and where."""
        role = self.first_available(*roles)
        if role is None:
            found = ", ".join(sorted(self._files)) or "nothing"
            raise CheckpointError(f"no {' or '.join(roles)} model in {self.path} (found: {found}); "
                                  f"a models folder holds subfolders {', '.join(ROLES)}, or pass a model "
                                  "folder / released GLIDE .pt file to from_pretrained")
        return role

    # -- loading -------------------------------------------------------------------------------

    def get(self, role: str) -> torch.nn.Module:
        with self._lock:
            if role not in self._models:
                self.require(role)
                self._models[role] = load_model(self._files[role], device=self.device, dtype=self.dtype)
            return self._models[role]

    def image_size(self, role: str) -> int:
        """The role's working resolution, read from its config without loading the weights."""
        self.require(role)
        if role in self._models:
            return self._models[role].config.image_size
        path = self._files[role]
        if path.is_dir():
            cfg = read_model_config(path)["config"]
            return int(cfg.get("image_size", 64))
        return 256 if role.startswith("upsampler") else 64  # the released GLIDE files

    def is_loaded(self, role: str) -> bool:
        return role in self._models

    def model_id(self, role: str) -> str:
        """Folder (or file) name + the first 12 hex digits of the weights file's sha256."""
        with self._lock:
            if role not in self._ids:
                self.require(role)
                path = self._files[role]
                weights = path / WEIGHTS_FILE if path.is_dir() else path
                name = path.name if path.is_dir() else path.stem
                self._ids[role] = f"{name}@{_sha256(weights)[:12]}"
            return self._ids[role]

    def describe(self) -> dict:
        return {role: str(path) for role, path in sorted(self._files.items())}

    def unload(self, role: str | None = None) -> None:
        with self._lock:
            for r in [role] if role else list(self._models):
                self._models.pop(r, None)


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if value not in (torch.float32, torch.float16, torch.bfloat16):
        raise PipelineInputError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


# -----------------------------------------------------------------------------
# Seeds and step specs


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> tuple[int, list[str]]:
    """The seed this call replays from. A given generator's initial seed is used (a fresh CPU
    generator is made from it, so the recorded seed reproduces the call); no seed → os.urandom."""
    warnings = []
    if generator is not None and not isinstance(generator, torch.Generator):
        raise PipelineInputError(f"generator must be a torch.Generator, got {type(generator).__name__}; "
                                 "or pass seed=<int>")
    if generator is not None:
        gen_seed = int(generator.initial_seed())
        fresh = torch.Generator(device=generator.device).manual_seed(gen_seed)
        if not torch.equal(fresh.get_state(), generator.get_state()):
            warnings.append("the generator had already been used; this call ran from a fresh generator "
                            f"seeded with its initial seed {gen_seed} (params['seed']) so that it can be replayed")
        if seed is not None and int(seed) != gen_seed:
            warnings.append(f"both seed={seed} and a generator were given; the generator's seed {gen_seed} was used")
        seed = gen_seed
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise PipelineInputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed), warnings


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def parse_steps(spec, name: str = "num_inference_steps") -> list[int]:
    """An int N, or a respacing string ("100", "fast27", "ddim25", "10,10,3,2,2") → kept timesteps."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str, np.integer)):
        raise PipelineInputError(f"{name} must be an int or a respacing string like '100', 'fast27', "
                                 f"'ddim25'; got {spec!r}")
    if isinstance(spec, (int, np.integer)) and not 1 <= int(spec) <= NUM_TIMESTEPS:
        raise PipelineInputError(f"{name} must be between 1 and {NUM_TIMESTEPS}, got {spec}")
    try:
        return respace(NUM_TIMESTEPS, int(spec) if isinstance(spec, (int, np.integer)) else spec)
    except ValueError as e:
        raise PipelineInputError(f"{name}={spec!r}: {e}") from e


def start_index(strength: float, num_steps: int) -> int:
    """How many of the kept steps an image-conditioned call runs: round(strength * n)."""
    return int(round(float(strength) * num_steps))


# -----------------------------------------------------------------------------
# Prompts


def encode_prompt(model, prompt: str, negative_prompt: str, num_images: int,
                  with_uncond: bool) -> tuple[TokenBatch, list[str]]:
    """Token rows for `model`: num_images prompt rows, then (for CFG) as many rows of the
    negative prompt, or of the empty prompt when there is none (GLIDE's unconditional tokens)."""
    tok = model.info.tokenizer
    if tok is None:
        raise CheckpointError(f"the model at {model.info.source} has no tokenizer (tokenizer.json, or "
                              "encoder.json + vocab.bpe beside a released file)")
    ctx = model.config.text_ctx
    cond = tok([prompt] * num_images, ctx)
    warnings = []
    if not prompt.strip() and not model.config.super_res:  # once per call: the upsampler stage stays quiet
        warnings.append("the prompt is empty, so no text guided this picture (an unconditional sample); "
                        "describe what you want to see")
    if cond.truncated[0]:
        n = len(tok.encode(prompt))
        warnings.append(f"the prompt is {n} tokens long; the {model.info.name} model reads {ctx}, "
                        "so it was truncated")
    unknown = list(dict.fromkeys(tok.unknown_words(prompt) + tok.unknown_words(negative_prompt)))
    if unknown:
        words = ", ".join(repr(w) for w in unknown)
        vocab = tok.known_words()
        hint = f"; it knows only these words: {' '.join(vocab)}" if len(vocab) <= 100 else ""
        warnings.append(f"the {model.info.name} model does not know the word{'s' if len(unknown) > 1 else ''} {words}, "
                        f"so it cannot follow {'them' if len(unknown) > 1 else 'it'}{hint}")
    if not with_uncond:
        return cond, warnings
    uncond = tok([negative_prompt] * num_images, ctx) if negative_prompt else tok.unconditional(num_images, ctx)
    if negative_prompt and uncond.truncated[0]:
        warnings.append(f"the negative prompt is longer than {ctx} tokens; it was truncated")
    return TokenBatch.cat([cond, uncond]), warnings


# -----------------------------------------------------------------------------
# Images


def to_rgb_array(image, name: str = "image") -> np.ndarray:
    """Any accepted image input → HxWx3 uint8 (the RGB that outputs are compared against)."""
    if image is None:
        raise PipelineInputError(f"{name} is required")
    img = load_image(image, "RGB")
    if img.width < 1 or img.height < 1:
        raise PipelineInputError(f"{name} is empty ({img.width}x{img.height})")
    return np.asarray(img, dtype=np.uint8).copy()


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounding as the GLIDE notebooks do."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] (e.g. a step preview) → PIL images."""
    return [Image.fromarray(a) for a in tensor_to_uint8(x)]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the uint8 grid, as the reference does to the base output before upsampling."""
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def resize_rgb(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Lanczos resize of HxWx3 uint8 to (w, h) (antialiased when shrinking)."""
    w, h = (size, size) if isinstance(size, int) else size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.LANCZOS))


def load_mask(mask_image, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """diffusers' mask (white = regenerate) → HxW bool (True = regenerate), resized to `size` (w, h)."""
    warnings = []
    m = load_mask_image(mask_image)
    if m.size != tuple(size):
        warnings.append(f"the mask is {m.width}x{m.height} but the image is {size[0]}x{size[1]}; "
                        "the mask was resized (nearest) to the image")
        m = m.resize(tuple(size), Image.NEAREST)
    return np.asarray(m) >= 128, warnings


def feather(regen: np.ndarray, mask_blur: float) -> np.ndarray:
    """Blend weight of the generated pixels, HxW float32: 0 wherever the mask is 0 (those pixels
    are copied bit-exactly), ramping up over `mask_blur` px INSIDE the mask edge (smoothstep of the
    distance to the nearest kept pixel), 1 deeper inside. mask_blur=0 → the hard mask."""
    if mask_blur <= 0 or regen.all():
        return regen.astype(np.float32)
    dist = cv2.distanceTransform(regen.astype(np.uint8), cv2.DIST_L2, 5)
    r = np.clip(dist / float(mask_blur), 0.0, 1.0)
    return (r * r * (3 - 2 * r) * regen).astype(np.float32)


# -----------------------------------------------------------------------------
# The "only masked" crop and the paste back

FILL_MAX = 512  # the regenerated area's neutral fill is computed at most at this resolution


@dataclass
class MaskedCrop:
    """A square box around the mask (+ padding), in image coordinates; it may reach past the image
    when the image is narrower than the box, and that outside part is regenerated then dropped.

    `crop` is the original under the box (edge-padded past the image), `filled` the same with the
    regenerated area replaced by a fill computed from the kept pixels only (so strength=1 output
    does not depend on what was under the mask), `regen_crop` is True where the model generates.
    """

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1 - x0 == y1 - y0)
    regen: np.ndarray  # HxW bool, full image, True = regenerate
    alpha: np.ndarray  # HxW float32 blend weight of generated pixels, 0 outside the mask
    crop: np.ndarray  # side x side x 3 uint8
    filled: np.ndarray  # side x side x 3 uint8
    regen_crop: np.ndarray  # side x side bool

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    @classmethod
    def build(cls, image: np.ndarray, regen: np.ndarray, padding: int, mask_blur: float) -> "MaskedCrop":
        H, W = regen.shape
        ys, xs = np.nonzero(regen)
        bx0, bx1, by0, by1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        side = max(bx1 - bx0, by1 - by0) + 2 * int(padding)
        side = max(min(side, max(W, H)), bx1 - bx0, by1 - by0)

        def place(lo, hi, extent):
            if side > extent:  # the box is wider than the image: centre it, the rest is padding
                return -((side - extent) // 2)
            start = int(round((lo + hi) / 2 - side / 2))
            return int(np.clip(start, max(0, hi - side), min(extent - side, lo)))

        x0, y0 = place(bx0, bx1, W), place(by0, by1, H)
        box = (x0, y0, x0 + side, y0 + side)
        crop = _crop_padded(image, box)
        outside = np.ones((side, side), bool)  # box pixels past the image: generated, then dropped
        outside[max(0, y0) - y0:min(H, y0 + side) - y0, max(0, x0) - x0:min(W, x0 + side) - x0] = False
        regen_crop = _crop_padded(regen, box) | outside
        return cls(box, regen, feather(regen, mask_blur), crop, _neutral_fill(crop, regen_crop), regen_crop)

    def working(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """At the model's resolution: the original (1,3,S,S), the known image (1,3,S,S) and GLIDE's
        mask (1,1,S,S), 1 = known. A working pixel is generated if any pixel under it is."""
        coverage = cv2.resize(self.regen_crop.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        keep = torch.from_numpy((coverage <= 1e-3).astype(np.float32))[None, None]
        return array_to_tensor(resize_rgb(self.crop, size)), array_to_tensor(resize_rgb(self.filled, size)), keep

    def paste(self, original: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """Composite a generated square (any size) back: only where alpha > 0; elsewhere the
        original pixels are copied unchanged."""
        x0, y0, x1, y1 = self.box
        H, W = original.shape[:2]
        big = resize_rgb(generated, self.side)
        ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        patch = big[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].astype(np.float32)
        out = original.copy()
        region = out[iy0:iy1, ix0:ix1]
        a = self.alpha[iy0:iy1, ix0:ix1, None]
        blended = np.rint(a * patch + (1 - a) * region.astype(np.float32)).clip(0, 255).astype(np.uint8)
        sel = self.alpha[iy0:iy1, ix0:ix1] > 0
        region[sel] = blended[sel]
        return out


def _crop_padded(arr: np.ndarray, box) -> np.ndarray:
    """arr[y0:y1, x0:x1] with edge replication where the box reaches past the array."""
    x0, y0, x1, y1 = box
    H, W = arr.shape[:2]
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    inner = arr[iy0:iy1, ix0:ix1]
    pad = [(iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(inner, pad, mode="edge") if any(p for pair in pad for p in pair) else inner.copy()


def _neutral_fill(crop: np.ndarray, regen: np.ndarray) -> np.ndarray:
    """The crop with its regenerated area filled from the kept pixels only (Telea inpainting on a
    nearest-neighbour copy of at most FILL_MAX px, so no masked pixel leaks in); grey when nothing
    is kept."""
    if not regen.any():
        return crop.copy()
    if regen.all():
        return np.full_like(crop, 127)
    side = crop.shape[0]
    small = min(side, FILL_MAX)
    c = cv2.resize(crop, (small, small), interpolation=cv2.INTER_NEAREST)
    m = cv2.resize(regen.astype(np.uint8), (small, small), interpolation=cv2.INTER_NEAREST)
    if m.all():
        fill = np.full_like(c, 127)
    else:
        c = np.where(m[..., None] > 0, 0, c).astype(np.uint8)
        fill = cv2.inpaint(c, m, 3, cv2.INPAINT_TELEA)
    fill = cv2.resize(fill, (side, side), interpolation=cv2.INTER_LINEAR)
    return np.where(regen[..., None], fill, crop).astype(np.uint8)


def count_changed(output: np.ndarray, original: np.ndarray, regen: np.ndarray) -> int:
    """Pixels outside the mask (regen False) whose RGB differs between output and input."""
    return int(((output != original).any(axis=-1) & ~regen).sum())


# -----------------------------------------------------------------------------
# The denoising engine: one stage (base or upsampler) of any pipeline


class _Progress:
    """Step counter over all stages of a call: user callback, interrupt, error context."""

    def __init__(self, total: int, callback: StepCallback | None, interrupt: threading.Event):
        self.total, self.callback, self.interrupt = total, callback, interrupt
        self.step = 0  # steps finished

    def check_interrupt(self) -> None:
        if self.interrupt.is_set():
            raise GenerationInterrupted(f"interrupted after {self.step} of {self.total} steps")

    def done(self, preview: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(self.step, self.total, preview)
        self.step += 1
        self.check_interrupt()


def _expand(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Repeat a (B, ...) conditioning tensor to `rows` rows ([cond; uncond] share it)."""
    if t is None or t.shape[0] == rows:
        return t
    return t.repeat(rows // t.shape[0], *([1] * (t.ndim - 1)))


def denoise(model, *, tokens: TokenBatch, guidance_scale: float, sampler: str, timesteps: Sequence[int],
            x_start: torch.Tensor, generator: torch.Generator, progress: _Progress,
            low_res: torch.Tensor | None = None, known: torch.Tensor | None = None,
            keep: torch.Tensor | None = None, inpaint_channels: bool = False, stage: str = "base",
            guidance_min_t: int = 0) -> torch.Tensor:
    """Run one sampling stage and return x_0 (B, 3, S, S) float32.

    tokens: B prompt rows, then B unconditional rows when guidance_scale != 1 (one forward on the
      doubled batch, `classifier_free_guidance`, at the timesteps >= guidance_min_t).
    known/keep: inpainting. keep is GLIDE's mask (1 = known). The known pixels are forced into
      every x_0 prediction (`denoised_fn`, as the reference). With `inpaint_channels` the model
      also sees them as extra input channels (fine-tuned model, GLIDE §4.3); without, the known
      region of x is replaced by a fresh sample of q(x_t | x_0) after every step (GLIDE App. E).
    """
    device = model.device
    B = x_start.shape[0]
    rows = tokens.tokens.shape[0]
    tok = tokens.to(device)
    low_res = _expand(low_res.to(device), rows) if low_res is not None else None
    kwargs = {}
    if known is not None:
        known, keep = known.to(device).expand(B, -1, -1, -1), keep.to(device).expand(B, -1, -1, -1)
        if inpaint_channels:
            kwargs = {"inpaint_image": _expand(known, rows), "inpaint_mask": _expand(keep, rows)}
    schedule = make_schedule(model.info.noise_schedule, NUM_TIMESTEPS)

    texts = {}  # rows -> encode_text output: the prompt is encoded once per batch size, not at every step

    def model_fn(x, t):
        n = x.shape[0]
        if n not in texts:  # (B and 2B rows encoded apart: a slice of the 2B encoding is not bit-identical)
            texts[n] = model.encode_text(tok.tokens[:n], tok.mask[:n])
        extra = {k: v[:n] for k, v in kwargs.items()}
        return model(x, t, text=texts[n], low_res=None if low_res is None else low_res[:n], **extra)

    guided = classifier_free_guidance(model_fn, guidance_scale, min_t=guidance_min_t)

    def checked_fn(x, t):
        progress.check_interrupt()
        out = guided(x, t)
        if not torch.isfinite(out).all():
            raise NonFiniteOutputError(
                f"the {stage} model ({model.info.name}) produced NaN/Inf at step {progress.step + 1} of "
                f"{progress.total} (timestep {int(t[0])}); run in float32 (dtype='float32') or use another model")
        return out

    denoised_fn = None
    if known is not None:
        def denoised_fn(x0):
            return x0 * (1 - keep) + known * keep

    def callback(info):
        x = info["x"]
        if known is not None and not inpaint_channels:
            if info["t_next"] >= 0:
                t_next = torch.full((B,), info["t_next"], dtype=torch.long, device=device)
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
                x = x * (1 - keep) + schedule.q_sample(known, t_next, noise) * keep
            else:
                x = x * (1 - keep) + known * keep
        progress.done(info["denoised"])
        return x

    return sample(checked_fn, x_start.to(device), schedule=schedule, timesteps=list(timesteps), method=sampler,
                  generator=generator, clip_denoised=True, denoised_fn=denoised_fn, callback=callback)


def upsampler_steps(spec, strength: float) -> tuple[list[int], bool]:
    """The kept timesteps an upsampler stage runs, and whether it starts from pure noise: the lowest
    round(strength * n) of the n kept steps of `spec`, at least one."""
    kept = parse_steps(spec, "upsample_steps")
    k = max(1, start_index(strength, len(kept)))
    return kept[:k], k == len(kept)


def enlarge(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic enlargement of a [-1, 1] batch: where a part-way upsampler stage starts from."""
    return torch.nn.functional.interpolate(low_res, size=(size, size), mode="bicubic",
                                           align_corners=False).clamp(-1, 1)


def initial_x(model, shape, generator: torch.Generator, *, timesteps: Sequence[int], image: torch.Tensor | None,
              full: bool, temperature: float = 1.0) -> torch.Tensor:
    """x at timesteps[-1]: noise * temperature, or q(x_t | image) when an image-conditioned call
    starts part-way (`full` False). The noise is drawn in both cases, so the stream is the same."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32) * temperature
    if full or image is None:
        return noise
    schedule = make_schedule(model.info.noise_schedule, NUM_TIMESTEPS)
    t = torch.full((shape[0],), timesteps[-1], dtype=torch.long)
    return schedule.q_sample(image.expand(shape[0], -1, -1, -1).float(), t, noise)


@dataclass
class Stage:
    """One sampling stage of a masked edit: which model, how it sees the known pixels, its steps."""

    model: torch.nn.Module
    inpaint_channels: bool  # fine-tuned model (known pixels as input channels) vs replacement
    timesteps: list[int]  # the kept timesteps this stage runs (already cut by strength)
    full: bool  # start from pure noise (strength 1)
    sampler: str
    guidance_scale: float
    temperature: float = 1.0
    guidance_min_t: int = 0


def edit_square(crop: MaskedCrop, *, prompt: str, negative_prompt: str, num_images: int, base: Stage,
                up: Stage | None, generator: torch.Generator, progress: _Progress, timings: dict,
                warnings: list[str]) -> np.ndarray:
    """Generate the crop's square at the base resolution (then through the upsampler when `up`):
    returns (B, S, S, 3) uint8 with the known pixels forced. Shared by inpainting and SDEdit."""
    B = num_images
    S = base.model.config.image_size
    x_orig, x_known, keep = crop.working(S)
    has_known = bool(keep.any())
    tokens, w = encode_prompt(base.model, prompt, negative_prompt, B, base.guidance_scale != 1)
    warnings += w
    t0 = time.perf_counter()
    x_start = initial_x(base.model, (B, 3, S, S), generator, timesteps=base.timesteps, image=x_orig, full=base.full)
    x0 = denoise(base.model, tokens=tokens, guidance_scale=base.guidance_scale, sampler=base.sampler,
                 timesteps=base.timesteps, x_start=x_start, generator=generator, progress=progress,
                 known=x_known if has_known else None, keep=keep, inpaint_channels=base.inpaint_channels,
                 guidance_min_t=base.guidance_min_t)
    timings["base_s"] = time.perf_counter() - t0
    if up is None:
        return tensor_to_uint8(x0)
    U = up.model.config.image_size
    xo_u, xk_u, keep_u = crop.working(U)
    tokens_up, w = encode_prompt(up.model, prompt, negative_prompt, B, up.guidance_scale != 1)
    warnings += [m for m in w if m not in warnings]
    t0 = time.perf_counter()
    low_res = quantize(x0)
    # the known pixels where there are any; elsewhere the enlarged base result the upsampler is conditioned on
    start_image = keep_u * xo_u + (1 - keep_u) * enlarge(low_res, U)
    x_start = initial_x(up.model, (B, 3, U, U), generator, timesteps=up.timesteps, image=start_image,
                        full=up.full, temperature=up.temperature)
    x0 = denoise(up.model, tokens=tokens_up, guidance_scale=up.guidance_scale, sampler=up.sampler,
                 timesteps=up.timesteps, x_start=x_start, generator=generator, progress=progress,
                 low_res=low_res, known=xk_u if bool(keep_u.any()) else None, keep=keep_u,
                 inpaint_channels=up.inpaint_channels, stage="upsampler")
    timings["upsample_s"] = time.perf_counter() - t0
    return tensor_to_uint8(x0)


# -----------------------------------------------------------------------------
# Result


@dataclass
class PipelineOutput:
    images: list  # PIL images (RGB)
    params: dict  # JSON-serialisable; `pipe(**params, image=..., mask_image=...)` replays the call
    changed_outside_mask: list[int] | None = None  # per image, for inpainting and masked SDEdit
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds: load_s, base_s, upsample_s, total_s, ...
    working_box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 of the square crop in the image
    working_size: int | None = None  # the model resolution the crop was generated at

    def __post_init__(self):
        # numpy scalars and tuples → plain JSON values, so params survive json.dumps / a scene file
        self.params = json.loads(json.dumps(self.params, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# -----------------------------------------------------------------------------
# Pipeline base class


def reproducible(call):
    """Wraps a pipeline's __call__: runs it with `num_threads` CPU threads (default: the current
    count) and records the count in params. CPU kernels reduce in a thread-count dependent order,
    so a replay is bit-exact only with the same count; passing params back restores it for the
    call (torch's thread count is process-wide: it is set back afterwards)."""

    @functools.wraps(call)
    def wrapper(self, *args, num_threads: int | None = None, **kwargs):
        before = torch.get_num_threads()
        if num_threads is None:
            num_threads = before
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or not 1 <= num_threads <= 4096:
            raise PipelineInputError(f"num_threads must be a positive integer, got {num_threads!r}")
        num_threads = int(num_threads)
        if num_threads != before:
            torch.set_num_threads(num_threads)
        try:
            out = call(self, *args, **kwargs)
        finally:
            if num_threads != before:
                torch.set_num_threads(before)
        out.params["num_threads"] = num_threads
        return out

    return wrapper


class BasePipeline:
    """from_pretrained, lazy shared models, interrupt, the parameter header of every result."""

    name = "pipeline"

    def __init__(self, store: ModelStore):
        self.store = store
        self.interrupt_event = threading.Event()

    @classmethod
    def from_pretrained(cls, path=None, device=None, dtype=None, store: ModelStore | None = None):
        """Load from a models folder, a model folder or a released GLIDE .pt (None: the shipped
        default models). Models load lazily on first use and are shared by every pipeline made
        from the same (path, device, dtype)."""
        if isinstance(path, ModelStore):
            store, path = path, None
        return cls(store if store is not None else ModelStore.shared(path, device, dtype))

    def interrupt(self) -> None:
        """Stop the running call at the next step (it raises GenerationInterrupted)."""
        self.interrupt_event.set()

    @property
    def interrupted(self) -> bool:
        return self.interrupt_event.is_set()

    def _load(self, role: str, timings: dict):
        t0 = time.perf_counter()
        model = self.store.get(role)
        timings["load_s"] = timings.get("load_s", 0.0) + time.perf_counter() - t0
        return model

    def _header(self, seed: int, models: dict, model_for_device=None) -> dict:
        device = dtype = None
        if model_for_device is not None:
            device, dtype = str(model_for_device.device), str(model_for_device.dtype).replace("torch.", "")
        return {"pipeline": self.name, "seed": seed, "models": models, "device": device, "dtype": dtype}

    def _replay_warnings(self, recorded_models, recorded_device, recorded_dtype, params: dict) -> list[str]:
        """When params of an earlier call are passed back: say what differs from this run."""
        out = []
        if recorded_models:
            for role, mid in recorded_models.items():
                now = params["models"].get(role)
                if now is not None and now != mid:
                    out.append(f"replaying with {role} model {now}, but the call was made with {mid}")
        for key, rec in (("device", recorded_device), ("dtype", recorded_dtype)):
            if rec is not None and params.get(key) is not None and rec != params[key]:
                out.append(f"the call was made with {key}={rec}, this run uses {params[key]}: pixels may differ")
        return out

    def _start(self, num_images: int, guidance_scale: float, sampler: str, pipeline: str | None):
        self.interrupt_event.clear()
        if pipeline is not None and pipeline != self.name:
            raise PipelineInputError(f"these params are for the {pipeline!r} pipeline, not {self.name!r}")
        check_common(num_images, guidance_scale, sampler)


def check_common(num_images, guidance_scale, sampler) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or not 1 <= num_images <= MAX_IMAGES:
        raise PipelineInputError(f"num_images must be an integer from 1 to {MAX_IMAGES}, got {num_images!r}")
    if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise PipelineInputError(f"guidance_scale must be a number >= 0 (1 = no guidance), got {guidance_scale!r}")
    if sampler not in SAMPLERS:
        raise PipelineInputError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")


def check_prompt(prompt, name="prompt") -> None:
    if not isinstance(prompt, str):
        raise PipelineInputError(f"{name} must be a string, got {type(prompt).__name__}")


def check_strength(strength, name="strength") -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise PipelineInputError(f"{name} must be a number from 0 to 1, got {strength!r}")


def check_mask_args(mask_blur, padding) -> None:
    if not isinstance(mask_blur, (int, float)) or not 0 <= mask_blur <= 256:
        raise PipelineInputError(f"mask_blur must be a number of pixels from 0 to 256, got {mask_blur!r}")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise PipelineInputError(f"padding must be a non-negative number of pixels, got {padding!r}")


def check_temperature(temperature, name="upsample_temperature") -> None:
    if not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise PipelineInputError(f"{name} must be in (0, 2], got {temperature!r}")


def check_guidance_min_t(guidance_min_t) -> None:
    if isinstance(guidance_min_t, bool) or not isinstance(guidance_min_t, (int, np.integer)) \
            or not 0 <= guidance_min_t <= NUM_TIMESTEPS:
        raise PipelineInputError(f"guidance_min_t must be a timestep from 0 to {NUM_TIMESTEPS} (guidance runs at "
                                 f"t >= it: 0 = every step, {NUM_TIMESTEPS} = none), got {guidance_min_t!r}")


def check_sampling_args(num_images, num_inference_steps, sampler, guidance_scale, guidance_min_t, upsample_steps,
                        upsample_sampler, upsample_temperature, upsample_strength) -> None:
    """The sampling arguments of a pipeline with a base and an optional upsampler stage."""
    check_common(num_images, guidance_scale, sampler)
    check_guidance_min_t(guidance_min_t)
    check_common(1, 1.0, upsample_sampler)
    parse_steps(num_inference_steps)
    parse_steps(upsample_steps, "upsample_steps")
    check_temperature(upsample_temperature)
    check_strength(upsample_strength, "upsample_strength")


class MaskedEditPipeline(BasePipeline):
    """The flow shared by inpainting and SDEdit: crop around the mask, edit the square at the
    model's resolution (optionally through the upsampler), paste back inside the mask only."""

    @staticmethod
    def _check_edit_args(strength, mask_blur, padding, num_images, num_inference_steps, sampler, guidance_scale,
                         guidance_min_t, upsample, upsample_steps, upsample_sampler, upsample_temperature,
                         upsample_strength) -> None:
        """The arguments inpainting and SDEdit share (after their prompts and own options)."""
        check_strength(strength)
        check_mask_args(mask_blur, padding)
        check_sampling_args(num_images, num_inference_steps, sampler, guidance_scale, guidance_min_t, upsample_steps,
                            upsample_sampler, upsample_temperature, upsample_strength)
        if upsample not in (None, True, False):
            raise PipelineInputError(f"upsample must be True, False or None (automatic), got {upsample!r}")

    @staticmethod
    def _crop_around_mask(image: np.ndarray, mask_image, *, padding: int, mask_blur: float, warnings: list[str],
                          if_empty: str) -> MaskedCrop:
        """Read diffusers' mask (white = regenerate, resized to the image) and build the working
        crop around it; EmptyMaskError(`if_empty`) when no pixel is white."""
        regen, w = load_mask(mask_image, (image.shape[1], image.shape[0]))
        warnings += w
        if not regen.any():
            raise EmptyMaskError(if_empty)
        return MaskedCrop.build(image, regen, padding=padding, mask_blur=mask_blur)

    def _resolve_upsample(self, upsample, side: int, roles: Sequence[str]) -> str | None:
        """The upsampler role to use, or None. upsample=None: automatic (an upsampler among
        `roles` exists and the crop is at least as large as its output); True: required."""
        if upsample is False:
            return None
        role = self.store.first_available(*roles)
        if upsample is None:
            return role if role is not None and side >= self.store.image_size(role) else None
        if role is None:
            raise CheckpointError(f"upsample=True but there is no {' or '.join(roles)} model in {self.store.path}")
        return role

    def _masked_edit(self, *, image: np.ndarray, crop: MaskedCrop, masked: bool, warnings: list[str],
                     params: dict, recorded: tuple, base_role: str, base_channels: bool, up_role: str | None,
                     up_channels: bool, callback_on_step_end, timings: dict, t_start: float) -> PipelineOutput:
        """Run the edit described by `params` (prompt, strength, steps, ... as recorded)."""
        p = params
        B = p["num_images"]
        kept = parse_steps(p["num_inference_steps"])
        k = start_index(p["strength"], len(kept))
        box = tuple(int(v) for v in crop.box)
        if k == 0:  # strength 0: nothing to do, the input comes back unchanged (no model call)
            if p["strength"] > 0:
                warnings.append(f"strength {p['strength']:g} runs round({p['strength']:g} x {len(kept)}) = 0 of the "
                                f"{len(kept)} steps, so the image came back unchanged; a strength of "
                                f"{0.5 / len(kept) + 1e-3:.3f} or more runs one step")
            timings["total_s"] = time.perf_counter() - t_start
            return PipelineOutput([Image.fromarray(image.copy()) for _ in range(B)], params,
                                  [0] * B if masked else None, warnings, timings, box, None)

        # 1. Models and stages
        base_model = self._load(base_role, timings)
        base = Stage(base_model, base_channels, kept[:k], k == len(kept), p["sampler"], p["guidance_scale"],
                     guidance_min_t=p["guidance_min_t"])
        up = None
        if up_role is not None:
            # the upsampler never starts earlier than the edit itself
            up_timesteps, up_full = upsampler_steps(p["upsample_steps"], min(p["strength"], p["upsample_strength"]))
            up = Stage(self._load(up_role, timings), up_channels, up_timesteps, up_full,
                       p["upsample_sampler"], 1.0, p["upsample_temperature"])
        params["device"], params["dtype"] = str(base_model.device), str(base_model.dtype).replace("torch.", "")
        warnings += self._replay_warnings(*recorded, params)
        # 2. Denoise the square
        total = len(base.timesteps) + (len(up.timesteps) if up else 0)
        progress = _Progress(total, callback_on_step_end, self.interrupt_event)
        squares = edit_square(crop, prompt=p["prompt"], negative_prompt=p["negative_prompt"], num_images=B,
                              base=base, up=up, generator=make_generator(p["seed"]), progress=progress,
                              timings=timings, warnings=warnings)
        # 3. Paste back inside the mask only, and count what changed outside it
        outputs = [crop.paste(image, sq) for sq in squares]
        changed = [count_changed(o, image, crop.regen) for o in outputs] if masked else None
        timings["total_s"] = time.perf_counter() - t_start
        timings["per_image_s"] = timings["total_s"] / B
        size = (up.model if up else base_model).config.image_size
        return PipelineOutput([Image.fromarray(o) for o in outputs], params, changed, warnings, timings, box, size)
