"""Shapes-world benchmark: scores generated, inpainted and SDEdited images
against their prompts with the world's detector (``pipelines.shapes.detect``),
the way GenEval scores images with an object detector.

Tasks
-----
* ``t2i``: the fixed, versioned prompt set (``shapes_prompts_v1.json``: groups
  single, pair, relation, background, held_out), N seeds each.  Reports the
  accuracy of each attribute (colour, shape, size, cell: over the objects that
  ask for it; count, relation, background: over the images that ask for it),
  ``object`` (an object with every asked attribute right) and ``full`` (the
  image holds exactly the named objects, each right, the relation and the
  background right), per group, in distribution (every group but held_out),
  for held-out combinations, and over all.
* ``inpaint``: ``shapes.inpaint_case`` scenes + mask + dense prompt of the
  edited scene.  Reports ``found`` (the requested colour and shape detected
  with its centroid inside the mask), ``found_cell`` (and in the asked cell),
  ``full`` (the whole prompt holds), the pixels changed outside the mask (must
  be 0) and ``seam``: the median deviation of the background from the world's
  lighting model (colour x vertical gradient) in a ring just inside the mask
  minus the same in a ring just outside, in levels (0 = seamless), averaged
  over the cases; ``seam_median`` is its median over the cases, which a few
  fills in an off colour cannot dominate.
* ``sdedit``: ``shapes.sdedit_case`` crude blobs + a prompt naming the
  shapes.  Reports ``found`` (right colour and shape where each blob was),
  ``color_at_blob``, ``shape_at_blob``, ``full``, and ``stray``: mean absolute
  difference between the blurred output and the blurred sketch (0-1).
* ``sweep``: alignment (``full``, ``object``) against diversity (mean pairwise
  mean-absolute-difference between the seeds of a prompt, 0-1) over guidance
  scales 1-8 (GLIDE Figure 6 on this world).

Every evaluation function takes callables, so it runs without a model:
``generate(prompt, seed, guidance_scale) -> PIL``,
``inpaint(image, mask, prompt, seed) -> PIL or (PIL, reported_changed_pixels)``,
``sdedit(image, prompt, seed) -> PIL``.  ``noise_model()`` and ``oracle_model()``
give the two reference points (near 0 and near 1).

CLI::

    python -m pipelines.bench.shapes --model PATH --seeds 8 --out bench_out/ \
        [--tasks t2i,inpaint,sdedit,sweep] [--noise | --oracle]

writes ``shapes_bench.json`` and PNG sample sheets into ``--out`` and prints a
table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines import shapes as W
from pipelines.defaults import DEFAULT_SDEDIT_STRENGTH, SAMPLERS, steps_from_text

PROMPTS_V1 = Path(__file__).with_name("shapes_prompts_v1.json")
DEFAULT_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
ATTRS = ("color", "shape", "size", "cell", "object", "count", "relation", "background", "full")

# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def load_prompts(path=None) -> dict:
    """The prompt set: {"version": ..., "groups": {group: [prompt, ...]}}."""
    with open(path or PROMPTS_V1) as fh:
        return json.load(fh)


def _prompt_list(prompts) -> list[tuple[str, str]]:
    """Normalise a prompt set to [(group, prompt)]: accepts the loaded JSON, a
    {group: [prompts]} dict, a list of prompts or a list of (group, prompt)."""
    if isinstance(prompts, dict):
        groups = prompts.get("groups", prompts)
        return [(g, p) for g, ps in groups.items() for p in ps]
    out = []
    for p in prompts:
        out.append(tuple(p) if isinstance(p, (tuple, list)) else ("all", p))
    return out


# ---------------------------------------------------------------------------
# The prompt checker
# ---------------------------------------------------------------------------


def check_prompt(prompt, detected) -> dict:
    """Judge a detected scene (``SceneSpec``) or an image against a prompt (or
    ``Requirements``).

    Required objects are matched one to one with detected objects (the best
    assignment: colour and shape first, then size and cell).  Returns per
    attribute the fraction right over the objects that ask for it (None when
    none asks), ``object``, and booleans ``count`` (exactly the named objects
    when ``exact_count``), ``relation``, ``background`` (None when not asked)
    and ``full``.
    """
    req = W.parse_prompt(prompt) if isinstance(prompt, str) else prompt
    det = detected if isinstance(detected, W.SceneSpec) else W.detect(detected)
    objs = sorted(det.objects, key=lambda o: -o.score)[:8]
    n, m = len(req.objects), len(objs)

    def obj_score(r: W.ObjectReq, o: Optional[W.ShapeObject]) -> dict:
        if o is None:
            return {a: (False if getattr(r, a) is not None else None) for a in ("color", "shape", "size", "cell")}
        return {a: (getattr(o, a) == getattr(r, a) if getattr(r, a) is not None else None)
                for a in ("color", "shape", "size", "cell")}

    best, best_val = None, -1.0
    choices = list(range(m)) + [None] * n
    seen = set()
    for assign in itertools.permutations(choices, n):
        if assign in seen:
            continue
        seen.add(assign)
        val = 0.0
        for r, j in zip(req.objects, assign):
            sc = obj_score(r, None if j is None else objs[j])
            val += 2 * bool(sc["color"]) + 2 * bool(sc["shape"]) + bool(sc["size"]) + bool(sc["cell"])
        if req.relation is not None:
            a, rel, b = req.relation
            ja, jb = assign[a], assign[b]
            if ja is not None and jb is not None and rel in W._relation(objs[ja], objs[jb]):
                val += 0.5
        if val > best_val:
            best, best_val = assign, val
    per = [obj_score(r, None if j is None else objs[j]) for r, j in zip(req.objects, best or [])]
    out: dict = {}
    for a in ("color", "shape", "size", "cell"):
        vals = [p[a] for p in per if p[a] is not None]
        out[a] = (sum(vals) / len(vals)) if vals else None
        out[f"_{a}"] = (sum(vals), len(vals))
    obj_ok = [all(v is not False for v in p.values()) and j is not None for p, j in zip(per, best or [])]
    out["object"] = sum(obj_ok) / n if n else None
    out["_object"] = (sum(obj_ok), n)
    out["count"] = (m == n) if req.exact_count else (m >= n)
    rel_ok = None
    if req.relation is not None:
        a, rel, b = req.relation
        ja, jb = best[a], best[b]
        rel_ok = bool(ja is not None and jb is not None and rel in W._relation(objs[ja], objs[jb]))
    out["relation"] = rel_ok
    out["background"] = (det.background == req.background) if req.background is not None else None
    out["full"] = bool(all(obj_ok) and out["count"] and rel_ok is not False and out["background"] is not False)
    out["n_detected"] = m
    out["detected"] = [f"{o.size} {o.color} {o.shape} @ {o.cell}" for o in objs]
    out["detected_background"] = det.background
    return out


def score_image(prompt: str, image) -> dict:
    """``check_prompt`` of an image (runs the detector)."""
    return check_prompt(prompt, W.detect(image))


class _Acc:
    """Accumulates checker results: object attributes over objects, image
    attributes over images."""

    def __init__(self):
        self.hits = {a: 0.0 for a in ATTRS}
        self.tot = {a: 0 for a in ATTRS}

    def add(self, res: dict):
        for a in ("color", "shape", "size", "cell", "object"):
            h, t = res[f"_{a}"]
            self.hits[a] += h
            self.tot[a] += t
        for a in ("count", "relation", "background", "full"):
            if res[a] is not None:
                self.hits[a] += bool(res[a])
                self.tot[a] += 1

    def summary(self) -> dict:
        out = {a: (self.hits[a] / self.tot[a] if self.tot[a] else None) for a in ATTRS}
        out["n_images"] = self.tot["full"]
        return out


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------
# Text to image
# ---------------------------------------------------------------------------


def eval_text2image(generate: Callable, prompts=None, seeds: Sequence[int] = (0, 1),
                    guidance_scale: float = 3.0, keep_images: bool = True) -> dict:
    """Generate every (prompt, seed) and score it.

    Returns {"summary": {"all", "in_distribution", "held_out", "groups": {...}},
    "records": [...], "images": [(group, prompt, seed, PIL)] (``keep_images``),
    "seconds_per_image"}.  Held-out accounting uses the prompt's content (a
    prompt naming a ``HELD_OUT`` pair), whatever its group.
    """
    plist = _prompt_list(load_prompts() if prompts is None else prompts)
    accs = {"all": _Acc(), "in_distribution": _Acc(), "held_out": _Acc()}
    gaccs: dict = {}
    records, images = [], []
    t_gen = 0.0
    for group, prompt in plist:
        req = W.parse_prompt(prompt)
        for seed in seeds:
            t0 = time.perf_counter()
            img = generate(prompt, int(seed), guidance_scale)
            t_gen += time.perf_counter() - t0
            res = check_prompt(req, W.detect(img))
            accs["all"].add(res)
            accs["held_out" if req.held_out else "in_distribution"].add(res)
            gaccs.setdefault(group, _Acc()).add(res)
            records.append({"group": group, "prompt": prompt, "seed": int(seed),
                            "held_out": req.held_out, **_public(res)})
            if keep_images:
                images.append((group, prompt, int(seed), img))
    n = max(1, len(records))
    summary = {k: a.summary() for k, a in accs.items()}
    summary["groups"] = {g: a.summary() for g, a in gaccs.items()}
    return {"guidance_scale": guidance_scale, "seeds": [int(s) for s in seeds], "summary": summary,
            "records": records, "images": images, "seconds_per_image": t_gen / n}


# ---------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------


def _as_rgb(img, size: Optional[int] = None) -> np.ndarray:
    a = W._to_array(img)
    if size is not None and a.shape[0] != size:
        a = cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA if a.shape[0] > size else cv2.INTER_LINEAR)
    return a


def seam_error(output, mask, scene: W.SceneSpec) -> dict:
    """Background continuity across the mask border, against the lighting.

    The residual of a pixel is its mean absolute deviation (levels) from the
    world's background model (the scene's background colour times the vertical
    gradient).  Pixels under any object or shadow of ``scene`` are left out.
    Returns {"inside", "outside", "seam"}: the median residual in a ring just
    inside the mask, just outside, and their difference (None when a ring is
    empty)."""
    out = _as_rgb(output).astype(np.float32)
    S = out.shape[0]
    m = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if m.shape[0] != S:
        m = cv2.resize(m, (S, S), interpolation=cv2.INTER_NEAREST)
    m = (m > 127).astype(np.uint8)
    w = max(2, int(round(0.03 * S)))
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * w + 1, 2 * w + 1))
    inner = m.astype(bool) & ~cv2.erode(m, k, borderType=cv2.BORDER_CONSTANT, borderValue=1).astype(bool)
    outer = cv2.dilate(m, k).astype(bool) & ~m.astype(bool)
    bgpix = np.ones((S, S), bool)
    for o in scene.objects:
        x0, y0, x1, y1 = W.object_footprint(o, 1.5 / S)
        bgpix[max(0, int(y0 * S)):int(math.ceil(y1 * S)), max(0, int(x0 * S)):int(math.ceil(x1 * S))] = False
    model = W.background_model(scene.background, S)[:, None, :]
    resid = np.abs(out - model).mean(-1)
    vi, vo = resid[inner & bgpix], resid[outer & bgpix]
    if vi.size < 5 or vo.size < 5:
        return {"inside": None, "outside": None, "seam": None}
    a, b = float(np.median(vi)), float(np.median(vo))
    return {"inside": a, "outside": b, "seam": a - b}


def _in_mask(mask_arr: np.ndarray, center) -> bool:
    S = mask_arr.shape[0]
    x = min(S - 1, max(0, int(center[0] * S)))
    y = min(S - 1, max(0, int(center[1] * S)))
    return bool(mask_arr[y, x] > 127)


def _iter_cases(cases, make_case, size: int):
    """(seed, case) pairs: an int n means seeds 0..n-1 and a seed is drawn with make_case(seed, size);
    a ready case tuple passes through with its position as the seed."""
    if isinstance(cases, int):
        cases = range(cases)
    for idx, case in enumerate(cases):
        if isinstance(case, (int, np.integer)):
            yield int(case), make_case(int(case), size)
        else:
            yield idx, case


def eval_inpaint(inpaint: Callable, cases: Iterable = 16, size: int = 64, keep_images: bool = True) -> dict:
    """Run ``inpaint(image, mask, prompt, seed)`` on inpainting cases and score.

    ``cases``: an int (that many ``shapes.inpaint_case(seed)``, seeds 0..n-1),
    seeds, or ready (image, mask, prompt, expected) tuples."""
    records, images = [], []
    t_gen = 0.0
    for seed, (image, mask, prompt, exp) in _iter_cases(cases, W.inpaint_case, size):
        t0 = time.perf_counter()
        res = inpaint(image, mask, prompt, seed)
        t_gen += time.perf_counter() - t0
        reported = None
        if isinstance(res, tuple):
            res, reported = res
        src = _as_rgb(image)
        S = src.shape[0]
        out = _as_rgb(res, S)
        m = np.asarray(mask.convert("L"))
        if m.shape[0] != S:
            m = cv2.resize(m, (S, S), interpolation=cv2.INTER_NEAREST)
        outside = m <= 127
        changed = int(((out != src).any(-1) & outside).sum())
        det = W.detect(out)
        hits = [o for o in det.objects if o.color == exp.color and o.shape == exp.shape and _in_mask(m, o.center)]
        found = bool(hits)
        found_cell = any(o.cell == exp.cell for o in hits)
        size_ok = any(o.size == exp.size for o in hits)
        full = check_prompt(prompt, det)["full"]
        seam = seam_error(out, m, exp.after)
        records.append({"seed": seed, "kind": exp.kind, "prompt": prompt,
                        "expected": f"{exp.size} {exp.color} {exp.shape} @ {exp.cell}",
                        "found": found, "found_cell": found_cell, "size": size_ok, "full": full,
                        "changed_outside": changed, "reported_changed_outside": reported,
                        "seam": seam["seam"], "seam_inside": seam["inside"], "seam_outside": seam["outside"],
                        "detected": [f"{o.size} {o.color} {o.shape} @ {o.cell}" for o in det.objects]})
        if keep_images:
            images.append((prompt, image, mask, Image.fromarray(out)))
    return {"summary": _inpaint_summary(records), "records": records, "images": images,
            "seconds_per_image": t_gen / max(1, len(records))}


def _mean(vals) -> Optional[float]:
    vals = [float(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _inpaint_summary(records: list) -> dict:
    out = {"n": len(records)}
    for k in ("found", "found_cell", "size", "full"):
        out[k] = _mean(r[k] for r in records)
    out["changed_outside_mean"] = _mean(r["changed_outside"] for r in records)
    out["changed_outside_max"] = max((r["changed_outside"] for r in records), default=None)
    out["untouched_outside"] = _mean(r["changed_outside"] == 0 for r in records)
    out["seam"] = _mean(r["seam"] for r in records)
    seams = [r["seam"] for r in records if r["seam"] is not None]
    out["seam_median"] = float(np.median(seams)) if seams else None
    for kind in ("add", "replace"):
        sub = [r for r in records if r["kind"] == kind]
        out[f"found_{kind}"] = _mean(r["found"] for r in sub)
    return out


# ---------------------------------------------------------------------------
# SDEdit
# ---------------------------------------------------------------------------


def stray(output, sketch, size: int = 64) -> float:
    """How far an output strays from its guide: mean absolute difference of
    the two images blurred (sigma 1.5% of the side) at ``size``, in 0-1."""
    a = _as_rgb(output, size).astype(np.float32)
    b = _as_rgb(sketch, size).astype(np.float32)
    s = 0.015 * size
    a = cv2.GaussianBlur(a, (0, 0), s)
    b = cv2.GaussianBlur(b, (0, 0), s)
    return float(np.abs(a - b).mean() / 255)


def eval_sdedit(sdedit: Callable, cases: Iterable = 16, size: int = 64, keep_images: bool = True) -> dict:
    """Run ``sdedit(sketch, prompt, seed)`` on SDEdit cases and score."""
    records, images = [], []
    t_gen = 0.0
    for seed, (sketch, prompt, exp) in _iter_cases(cases, W.sdedit_case, size):
        t0 = time.perf_counter()
        out = sdedit(sketch, prompt, seed)
        t_gen += time.perf_counter() - t0
        det = W.detect(out)
        found, col_ok, shp_ok = [], [], []
        for o, (x0, y0, x1, y1) in zip(exp.objects, exp.blob_boxes):
            g = 0.05
            near = [d for d in det.objects
                    if x0 - g <= d.center[0] <= x1 + g and y0 - g <= d.center[1] <= y1 + g]
            found.append(any(d.color == o.color and d.shape == o.shape for d in near))
            col_ok.append(any(d.color == o.color for d in near))
            shp_ok.append(any(d.shape == o.shape for d in near))
        records.append({"seed": seed, "prompt": prompt, "found": all(found),
                        "found_objects": sum(found) / len(found),
                        "color_at_blob": sum(col_ok) / len(col_ok), "shape_at_blob": sum(shp_ok) / len(shp_ok),
                        "full": check_prompt(prompt, det)["full"], "stray": stray(out, sketch),
                        "detected": [f"{o.size} {o.color} {o.shape} @ {o.cell}" for o in det.objects]})
        if keep_images:
            images.append((prompt, sketch, out))
    summ = {"n": len(records)}
    for k in ("found", "found_objects", "color_at_blob", "shape_at_blob", "full", "stray"):
        summ[k] = _mean(r[k] for r in records)
    return {"summary": summ, "records": records, "images": images,
            "seconds_per_image": t_gen / max(1, len(records))}


# ---------------------------------------------------------------------------
# Guidance sweep
# ---------------------------------------------------------------------------


def diversity(images: Sequence, size: int = 64) -> Optional[float]:
    """Mean pairwise distance between images (mean absolute difference, 0-1)."""
    arrs = [_as_rgb(im, size).astype(np.float32) for im in images]
    if len(arrs) < 2:
        return None
    d = [np.abs(a - b).mean() / 255 for a, b in itertools.combinations(arrs, 2)]
    return float(np.mean(d))


def guidance_sweep(generate: Callable, prompts=None, seeds: Sequence[int] = (0, 1, 2, 3),
                   scales: Sequence[float] = DEFAULT_SCALES, keep_images: bool = True) -> dict:
    """Alignment against diversity over guidance scales (GLIDE Figure 6).

    Returns {"rows": [{"scale", "full", "object", "diversity"}], "images":
    {scale: [(prompt, [PIL per seed])]}}."""
    plist = _prompt_list(load_prompts() if prompts is None else prompts)
    rows, images = [], {}
    for g in scales:
        res = eval_text2image(generate, plist, seeds, guidance_scale=g, keep_images=True)
        by_prompt: dict = {}
        for _, p, _, im in res["images"]:
            by_prompt.setdefault(p, []).append(im)
        div = _mean(diversity(v) for v in by_prompt.values())
        s = res["summary"]["all"]
        rows.append({"scale": g, "full": s["full"], "object": s["object"], "color": s["color"],
                     "shape": s["shape"], "diversity": div})
        if keep_images:
            images[g] = list(by_prompt.items())
    return {"rows": rows, "images": images, "seeds": [int(s) for s in seeds]}


# ---------------------------------------------------------------------------
# Reference "models"
# ---------------------------------------------------------------------------


def noise_model(size: int = 64):
    """(generate, inpaint, sdedit) that output uniform noise (the inpainter
    keeps the pixels outside the mask).  A sound benchmark scores them ~0."""

    def noise(seed):
        return np.random.default_rng(10_000 + seed).integers(0, 256, (size, size, 3), dtype=np.uint8)

    def generate(prompt, seed, guidance_scale):
        return Image.fromarray(noise(seed))

    def inpaint(image, mask, prompt, seed):
        src = _as_rgb(image, size)
        m = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST)) > 127
        out = np.where(m[..., None], noise(seed), src)
        return Image.fromarray(out.astype(np.uint8))

    def sdedit(image, prompt, seed):
        return Image.fromarray(noise(seed))

    return generate, inpaint, sdedit


def oracle_model(size: int = 64):
    """(generate, inpaint, sdedit) that draw the world itself: the upper bound
    (and a check of the benchmark).  ``generate`` draws ``spec_from_prompt``;
    ``inpaint`` pastes a fresh drawing of the edited scene inside the mask;
    ``sdedit`` draws the named shapes at the blobs' places."""

    def generate(prompt, seed, guidance_scale):
        return W.render(W.spec_from_prompt(prompt, seed), size)

    def inpaint(image, mask, prompt, seed):
        # the oracle knows the case: rebuild it from the prompt's scene
        req = W.parse_prompt(prompt)
        src = _as_rgb(image, size)
        det = W.detect(src)
        m = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST)) > 127
        keep = [o for o in det.objects if not _in_mask(m.astype(np.uint8) * 255, o.center)]
        # the new object: the asked one whose cell is inside the mask
        objs = list(keep)
        rng = np.random.default_rng(seed)
        for r in req.objects:
            if any(o.color == r.color and o.shape == r.shape for o in keep):
                continue
            for _ in range(200):  # a placement whose footprint the mask covers
                o = W._place(r.shape, W._draw_scale(r.size or "small", rng), r.cell or "center", rng,
                             objs, r.color, r.size or "small", tries=1)
                if o is None:
                    continue
                x0, y0, x1, y1 = W.object_footprint(o)
                win = m[max(0, int(y0 * size)):int(math.ceil(y1 * size)),
                        max(0, int(x0 * size)):int(math.ceil(x1 * size))]
                if win.size and win.all():
                    objs.append(o)
                    break
        spec = W.SceneSpec(req.background or det.background or "gray", objs, int(rng.integers(2**31 - 1)))
        new = W.render_array(spec, size)
        return Image.fromarray(np.where(m[..., None], new, src).astype(np.uint8))

    def sdedit(image, prompt, seed):
        req = W.parse_prompt(prompt)
        rng = np.random.default_rng(seed)
        src = _as_rgb(image, size).astype(np.float32)
        objs: list = []
        used: set = set()
        for r in req.objects:
            # the blob: the largest unused blob of the named colour in the
            # sketch; draw the named shape at its centroid, about its width
            near = (np.linalg.norm(src - np.asarray(W.COLORS[r.color], np.float32), axis=-1) < 45)
            n, lab, stats, _ = cv2.connectedComponentsWithStats(near.astype(np.uint8), connectivity=8)
            comps = sorted((i for i in range(1, n) if (r.color, i) not in used), key=lambda i: -stats[i][4])
            if not comps:
                continue
            used.add((r.color, comps[0]))
            ys, xs = np.nonzero(lab == comps[0])
            cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
            scale = float(np.clip((xs.max() - xs.min() + 1) / size, 0.17, 0.42))
            sz = W.size_name(scale)
            cell = W.CELLS[min(2, int(cy * 3)) * 3 + min(2, int(cx * 3))]
            objs.append(W.ShapeObject(r.shape, r.color, sz, cell, (float(cx), float(cy)), scale))
        bg = req.background or "gray"
        return W.render(W.SceneSpec(bg, objs, int(rng.integers(2**31 - 1))), size)

    return generate, inpaint, sdedit


# ---------------------------------------------------------------------------
# Sample sheets and tables
# ---------------------------------------------------------------------------


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def make_grid(rows: Sequence[Sequence[Image.Image]], labels: Optional[Sequence[str]] = None,
              tile: int = 128, label_h: int = 30) -> Image.Image:
    """A sheet: each row a list of images (scaled to ``tile``), a wrapped text
    label under each row's first tile (or the row) when ``labels`` is given."""
    ncol = max((len(r) for r in rows), default=1)
    lh = label_h if labels else 0
    sheet = Image.new("RGB", (ncol * tile, len(rows) * (tile + lh)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    chars = max(10, ncol * tile // 6)
    for i, row in enumerate(rows):
        y = i * (tile + lh)
        for j, im in enumerate(row):
            if im is None:
                continue
            im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            sheet.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (j * tile, y))
        if labels:
            text = "\n".join(textwrap.wrap(str(labels[i]), chars)[:2])
            draw.text((2, y + tile + 1), text, fill=(0, 0, 0), font=font)
    return sheet


def _fmt(v) -> str:
    if v is None:
        return "   -  "
    if isinstance(v, float):
        return f"{v:6.3f}"
    return f"{v!s:>6}"


def format_t2i(res: dict) -> str:
    cols = ("color", "shape", "size", "cell", "count", "relation", "background", "object", "full", "n_images")
    head = f"{'text-to-image':<18}" + "".join(f"{c[:6]:>7}" for c in cols)
    lines = [head, "-" * len(head)]
    s = res["summary"]
    rows = [(g, s["groups"][g]) for g in s["groups"]] + [
        ("in distribution", s["in_distribution"]), ("held out", s["held_out"]), ("all", s["all"])]
    for name, r in rows:
        lines.append(f"{name:<18}" + "".join(f" {_fmt(r.get(c))}" for c in cols))
    return "\n".join(lines)


def format_summary(title: str, summ: dict) -> str:
    return title + ": " + ", ".join(f"{k}={_fmt(v).strip()}" for k, v in summ.items())


def format_sweep(res: dict) -> str:
    head = f"{'guidance':>8} {'full':>7} {'object':>7} {'color':>7} {'shape':>7} {'divers':>7}"
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(f"{r['scale']:>8.1f} " + " ".join(_fmt(r[k]) + " " for k in
                                                       ("full", "object", "color", "shape", "diversity")))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _pipeline_model(args):
    """(generate, inpaint, sdedit) backed by the project's pipelines, built lazily."""
    import pipelines as P

    cache: dict = {}
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}
    if args.sampler:
        kw["sampler"] = args.sampler
    if args.guidance_min_t is not None:
        kw["guidance_min_t"] = args.guidance_min_t
    inpaint_kw = kw if args.inpaint_guidance is None else {**kw, "guidance_scale": args.inpaint_guidance}
    sdedit_kw = kw if args.sdedit_guidance is None else {**kw, "guidance_scale": args.sdedit_guidance}

    def get(name):
        if name not in cache:
            cache[name] = getattr(P, name).from_pretrained(args.model)
        return cache[name]

    def generate(prompt, seed, guidance_scale):
        out = get("Text2ImagePipeline")(prompt=prompt, num_images=1, guidance_scale=guidance_scale,
                                        seed=seed, upsample=False, **kw)
        return out.images[0]

    # edits stay at the cases' resolution (upsample=False): they are scored there
    def inpaint(image, mask, prompt, seed):
        out = get("InpaintPipeline")(prompt=prompt, image=image, mask_image=mask,
                                     mode=args.inpaint_mode, seed=seed, upsample=False, **inpaint_kw)
        rep = getattr(out, "changed_outside_mask", None)
        return out.images[0], (int(rep[0]) if rep else None)

    def sdedit(image, prompt, seed):
        out = get("SDEditPipeline")(prompt=prompt, image=image, strength=args.strength, seed=seed,
                                    upsample=False, **sdedit_kw)
        return out.images[0]

    return generate, inpaint, sdedit


def _limit_prompts(pset: dict, groups: Optional[str], limit: Optional[int]) -> dict:
    g = pset["groups"]
    if groups:
        keep = [x.strip() for x in groups.split(",")]
        g = {k: v for k, v in g.items() if k in keep}
    if limit:
        g = {k: v[:limit] for k, v in g.items()}
    return {**pset, "groups": g}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench.shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path for the pipelines' from_pretrained (default: shipped)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per prompt (t2i)")
    ap.add_argument("--out", default="bench_out", help="output folder (JSON + PNG sheets)")
    ap.add_argument("--tasks", default="t2i,inpaint,sdedit,sweep")
    ap.add_argument("--prompts", default=None, help="prompt set JSON (default: shapes_prompts_v1.json)")
    ap.add_argument("--groups", default=None, help="comma-separated prompt groups to run")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts per group")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance scale for t2i")
    ap.add_argument("--steps", type=steps_from_text, default=None,
                    help="num_inference_steps: an int or a respacing string such as ddim25 (default: pipeline's)")
    ap.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: pipeline's)")
    ap.add_argument("--guidance-min-t", type=int, default=None,
                    help="guidance only at timesteps t >= this (default: pipeline's)")
    ap.add_argument("--inpaint-cases", type=int, default=32)
    ap.add_argument("--inpaint-mode", default="finetuned", choices=("finetuned", "replace"))
    ap.add_argument("--inpaint-guidance", type=float, default=None, help="guidance scale (default: pipeline's)")
    ap.add_argument("--sdedit-cases", type=int, default=32)
    ap.add_argument("--strength", type=float, default=DEFAULT_SDEDIT_STRENGTH, help="SDEdit strength")
    ap.add_argument("--sdedit-guidance", type=float, default=None, help="guidance scale (default: pipeline's)")
    ap.add_argument("--sweep-scales", default=",".join(str(s) for s in DEFAULT_SCALES))
    ap.add_argument("--sweep-seeds", type=int, default=4)
    ap.add_argument("--sweep-prompts", type=int, default=8, help="prompts (first of each group, round robin)")
    ap.add_argument("--size", type=int, default=64, help="size of inpainting / SDEdit cases")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--noise", action="store_true", help="score a model that outputs uniform noise (~0)")
    ref.add_argument("--oracle", action="store_true", help="score the world's own drawings (~1)")
    args = ap.parse_args(argv)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.noise:
        generate, inpaint, sdedit = noise_model(args.size)
        model_name = "noise"
    elif args.oracle:
        generate, inpaint, sdedit = oracle_model(args.size)
        model_name = "oracle"
    else:
        generate, inpaint, sdedit = _pipeline_model(args)
        model_name = args.model or "default"
    pset = _limit_prompts(load_prompts(args.prompts), args.groups, args.limit)
    seeds = list(range(args.seeds))
    result: dict = {"benchmark": "shapes", "prompt_set": pset.get("version"), "model": model_name,
                    "args": vars(args), "tasks": {}}
    t_start = time.perf_counter()

    if "t2i" in tasks:
        res = eval_text2image(generate, pset, seeds, guidance_scale=args.guidance)
        print(format_t2i(res), flush=True)
        first = {}
        for g, p, s, im in res["images"]:
            first.setdefault(p, []).append(im)
        rows = [ims[:8] for ims in first.values()]
        make_grid(rows, list(first)).save(out_dir / "t2i_samples.png")
        result["tasks"]["t2i"] = {k: v for k, v in res.items() if k != "images"}
    if "inpaint" in tasks:
        res = eval_inpaint(inpaint, args.inpaint_cases, size=args.size)
        print(format_summary("inpaint", res["summary"]), flush=True)
        rows = [[img, mask, out] for _, img, mask, out in res["images"][:24]]
        make_grid(rows, [p for p, *_ in res["images"][:24]]).save(out_dir / "inpaint_samples.png")
        result["tasks"]["inpaint"] = {k: v for k, v in res.items() if k != "images"}
    if "sdedit" in tasks:
        res = eval_sdedit(sdedit, args.sdedit_cases, size=args.size)
        print(format_summary("sdedit", res["summary"]), flush=True)
        rows = [[sk, out] for _, sk, out in res["images"][:24]]
        make_grid(rows, [p for p, *_ in res["images"][:24]]).save(out_dir / "sdedit_samples.png")
        result["tasks"]["sdedit"] = {k: v for k, v in res.items() if k != "images"}
    if "sweep" in tasks:
        groups = list(pset["groups"].values())
        picked = []
        for i in itertools.count():
            if len(picked) >= args.sweep_prompts or all(i >= len(g) for g in groups):
                break
            for g, name in zip(groups, pset["groups"]):
                if i < len(g) and len(picked) < args.sweep_prompts:
                    picked.append((name, g[i]))
        scales = [float(s) for s in args.sweep_scales.split(",")]
        res = guidance_sweep(generate, picked, list(range(args.sweep_seeds)), scales)
        print(format_sweep(res), flush=True)
        rows, labels = [], []
        for _, prompt in picked:
            for g in scales:
                rows.append(dict(res["images"][g]).get(prompt, []))
                labels.append(f"guidance {g:g}: {prompt}")
        make_grid(rows, labels).save(out_dir / "sweep_samples.png")
        result["tasks"]["sweep"] = {k: v for k, v in res.items() if k != "images"}
    result["seconds"] = time.perf_counter() - t_start
    with open(out_dir / "shapes_bench.json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(f"wrote {out_dir / 'shapes_bench.json'} and sample sheets ({result['seconds']:.1f}s)")
    return result


if __name__ == "__main__":
    main()
