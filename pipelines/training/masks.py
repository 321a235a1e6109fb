"""Random inpainting masks for `finetune-inpaint` (GLIDE §4.3: "random regions of training examples are erased").

A mask is float32 [size, size] with GLIDE's convention: 1 = KNOWN (kept, shown to the model),
0 = erased (the model generates it). Every draw takes a numpy Generator, so a mask is a pure
function of the per-sample generator and resuming a run reproduces it exactly.

Kinds (what users do in the studio's inpainting canvas):
  box       one to three axis-aligned rectangles erased
  ellipse   one or two ellipses erased (round objects)
  brush     free-hand strokes of varying width (the brush tool)
  outpaint  a border strip erased on one to four sides (extending the canvas)
  whole     everything erased: plain text-to-image, so the inpainting model keeps that skill
"""

from __future__ import annotations

import cv2
import numpy as np

# why: boxes/brushes dominate real use; 'whole' stays small but non-zero so the widened model
# does not forget unconditional-context generation (its input then matches the base model's).
DEFAULT_WEIGHTS = {"box": 0.3, "ellipse": 0.2, "brush": 0.25, "outpaint": 0.15, "whole": 0.1}
KINDS = tuple(DEFAULT_WEIGHTS)


def _box(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.ones((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        h, w = (int(rng.integers(max(1, size // 8), max(2, size * 3 // 4) + 1)) for _ in range(2))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask[top:top + h, left:left + w] = 0
    return mask


def _ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.ones((size, size), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(max(1, size // 10), max(2, size // 2) + 1)),
                int(rng.integers(max(1, size // 10), max(2, size // 2) + 1)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(mask, center, axes, angle, 0, 360, 0.0, thickness=-1)
    return mask


def _brush(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.ones((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        width = int(rng.integers(max(1, size // 24), max(2, size // 6) + 1))
        point = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(2, 8))):
            angle += rng.normal(0, 0.8)  # a wandering stroke, not a straight line
            step = rng.uniform(size / 10, size / 3)
            nxt = np.clip(point + step * np.array([np.cos(angle), np.sin(angle)]), 0, size - 1)
            cv2.line(mask, tuple(int(v) for v in point), tuple(int(v) for v in nxt), 0.0, width, cv2.LINE_8)
            point = nxt
    return mask


def _outpaint(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.ones((size, size), np.float32)
    sides = rng.random(4) < 0.5
    if not sides.any():
        sides[int(rng.integers(0, 4))] = True
    for side, on in enumerate(sides):
        if not on:
            continue
        depth = int(rng.integers(max(1, size // 8), max(2, size // 2) + 1))
        if side == 0:
            mask[:depth] = 0
        elif side == 1:
            mask[-depth:] = 0
        elif side == 2:
            mask[:, :depth] = 0
        else:
            mask[:, -depth:] = 0
    return mask


def _whole(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.zeros((size, size), np.float32)


_MAKERS = {"box": _box, "ellipse": _ellipse, "brush": _brush, "outpaint": _outpaint, "whole": _whole}


def parse_weights(spec: str | dict | None) -> dict[str, float]:
    """'box=0.3,brush=0.7' or a dict -> normalised weights over known kinds (None = defaults)."""
    if spec is None or spec == "":
        weights = dict(DEFAULT_WEIGHTS)
    elif isinstance(spec, dict):
        weights = {k: float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in str(spec).split(","):
            name, _, value = part.partition("=")
            weights[name.strip()] = float(value) if value else 1.0
    unknown = sorted(set(weights) - set(_MAKERS))
    if unknown:
        raise ValueError(f"unknown mask kinds {unknown}; choose from {list(KINDS)} (e.g. 'box=0.5,brush=0.5')")
    total = sum(weights.values())
    if not total > 0 or any(not 0 <= v < float("inf") for v in weights.values()):  # NaN fails both
        raise ValueError(f"mask weights must be non-negative with a positive sum, got {weights}")
    return {k: v / total for k, v in weights.items() if v > 0}


def random_mask(rng: np.random.Generator, size: int, weights: dict[str, float] | None = None) -> np.ndarray:
    """One random mask, float32 [size, size], 1 = known, 0 = generate."""
    weights = weights or DEFAULT_WEIGHTS
    kinds = list(weights)
    kind = kinds[int(rng.choice(len(kinds), p=np.array([weights[k] for k in kinds]) / sum(weights.values())))]
    return _MAKERS[kind](rng, size)
