"""How much a base model uses its captions, per noise level.

    python -m pipelines.bench.caption_use [--model PATH] [--items 32] [--captions short] [--parts] [--timesteps 850,950]

For fixed shapes scenes, noise and timesteps t, it prints the noise-prediction error with each
scene's own caption, another scene's caption and the empty caption, and two ratios:
  gain vs another: 1 - mse(own) / mse(another)   (does a wrong caption hurt?)
  gain vs empty:   1 - mse(own) / mse(empty)     (does the right caption help? classifier-free
                                                  guidance amplifies exactly this difference)
The training log's caption_gain is the first ratio averaged over random t. A model that has learned
its text shows a large gain vs empty at mid-to-high t (where layout and colour are decided).
With --parts it asks which words of a dense caption the model reads: per t, how much the error rises
when one kind of word (every object's colour, shape, size or cell, or the background) is replaced by
a wrong one of its kind, the rest of the caption kept, and (column "relation", on as many two-object
scenes) when a true relational caption says the opposite ("left of" for "right of", "above" for
"below"). A rise near 0 means those words are ignored.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from torch.utils.data import default_collate

from .. import shapes
from ..base import ModelStore
from ..diffusion import make_schedule
from ..training.data import ShapesSource, TrainingDataset
from ..training.train import to_model_inputs

TIMESTEPS = (100, 300, 500, 700, 850, 950)


@torch.no_grad()
def caption_use(model, items: int, captions: str, timesteps=TIMESTEPS, seed: int = 123) -> list[dict]:
    """Per timestep: mse with own / another / empty captions on `items` fixed shapes scenes."""
    tok, ctx = model.info.tokenizer, model.config.text_ctx
    data = TrainingDataset(ShapesSource(model.config.image_size, captions), tok, ctx, seed=seed, caption_drop=0)
    inputs = to_model_inputs(default_collate([data[i] for i in range(items)]), model.device)
    x0 = inputs["x0"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    empty = tok.unconditional(items, ctx).to(model.device)
    conditions = {"own": (inputs["tokens"], inputs["mask"]),
                  "another": (inputs["tokens"].roll(1, 0), inputs["mask"].roll(1, 0)),
                  "empty": (empty.tokens, empty.mask)}
    return [{"t": t, **mse, "gain_vs_another": 1 - mse["own"] / mse["another"],
             "gain_vs_empty": 1 - mse["own"] / mse["empty"]}
            for t, mse in zip(timesteps, _errors(model, x0, noise, conditions, timesteps))]


def _errors(model, x0, noise, conditions: dict, timesteps) -> list[dict]:
    """Per timestep, the noise-prediction mse of x0 noised with `noise` under each (tokens, mask) condition."""
    schedule = make_schedule(model.info.noise_schedule)
    rows = []
    for t in timesteps:
        tt = torch.full((x0.shape[0],), t, device=x0.device)
        x_t = schedule.q_sample(x0, tt, noise)
        rows.append({name: ((model(x_t, tt, tokens, mask)[:, :3].float() - noise) ** 2).mean().item()
                     for name, (tokens, mask) in conditions.items()})
    return rows


CAPTION_PARTS = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES), "size": list(shapes.SIZES),
                 "cell": list(shapes.CELL_PHRASES), "background": list(shapes.BACKGROUNDS)}


def _wrong(value: str, choices: list[str], rng: np.random.Generator) -> str:
    others = [c for c in choices if c != value]
    return others[int(rng.integers(len(others)))]


def _dense_with_wrong(spec: shapes.SceneSpec, part: str, rng: np.random.Generator) -> str:
    """The scene's dense caption with every word of kind `part` replaced by a wrong one."""
    if part == "background":
        return shapes.dense_caption(spec.objects, _wrong(spec.background, CAPTION_PARTS[part], rng))
    objects = [dataclasses.replace(o, **{part: _wrong(getattr(o, part), CAPTION_PARTS[part], rng)})
               for o in spec.objects]
    return shapes.dense_caption(objects, spec.background)


OPPOSITE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def _relation_flipped(caption: str) -> str:
    """A true relational caption with its relation turned to the opposite one, which is then false."""
    for key, phrase in shapes.RELATIONS.items():
        if f" {phrase} " in caption:
            return caption.replace(f" {phrase} ", f" {shapes.RELATIONS[OPPOSITE_RELATION[key]]} ", 1)
    raise ValueError(f"no relation in {caption!r}")


def _part_errors(model, specs, captions: dict, timesteps, seed: int) -> list[dict]:
    """Per timestep, the mse of the rendered `specs` noised with a fixed noise, under each list of captions."""
    x0 = torch.tensor(np.stack([shapes.render_array(s, model.config.image_size) for s in specs]))
    x0 = (x0.permute(0, 3, 1, 2).float() / 127.5 - 1).to(model.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(model.device)
    conditions = {}
    for name, caps in captions.items():
        batch = model.info.tokenizer(caps, model.config.text_ctx).to(model.device)
        conditions[name] = (batch.tokens, batch.mask)
    return _errors(model, x0, noise, conditions, timesteps)


@torch.no_grad()
def caption_part_use(model, items: int, timesteps=TIMESTEPS, seed: int = 123) -> list[dict]:
    """Per timestep: the relative rise of the error when each part of the dense caption is made wrong, and
    (on `items` two-object scenes with a relational caption) when the relation is turned to its opposite."""
    rng = np.random.default_rng(seed)
    specs = [shapes.random_scene(rng) for _ in range(items)]
    captions = {"own": [shapes.dense_caption(s.objects, s.background) for s in specs],
                **{part: [_dense_with_wrong(s, part, rng) for s in specs] for part in CAPTION_PARTS}}
    dense = _part_errors(model, specs, captions, timesteps, seed)
    pairs = []
    while len(pairs) < items:
        spec = shapes.random_scene(rng)
        if len(spec.objects) == 2:
            pairs.append(spec)
    true_captions = [shapes.relational_captions(s) for s in pairs]
    own = [caps[int(rng.integers(len(caps)))] for caps in true_captions]
    relational = _part_errors(model, pairs, {"own": own, "relation": [_relation_flipped(c) for c in own]},
                              timesteps, seed)
    return [{"t": t, "own": mse["own"], **{part: mse[part] / mse["own"] - 1 for part in CAPTION_PARTS},
             "relation": rel["relation"] / rel["own"] - 1}
            for t, mse, rel in zip(timesteps, dense, relational)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="models folder or base model folder (default: the shipped models)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--captions", default="short",
                    help="shapes caption form: mix | dense | short | short_bg, or form weights such as "
                         "'dense=0.3,relational=0.5,short=0.2'")
    ap.add_argument("--parts", action="store_true",
                    help="which words of a dense caption are read: error rise with each kind made wrong")
    ap.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)),
                    help="comma-separated noise levels t to measure at")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        ap.error(f"--timesteps takes comma-separated integers such as 850,950, got {args.timesteps!r}")
    model = ModelStore(args.model, device=args.device, dtype=torch.float32).get("base")
    num_timesteps = make_schedule(model.info.noise_schedule).num_timesteps
    if not all(0 <= t < num_timesteps for t in timesteps):
        ap.error(f"--timesteps must lie in [0, {num_timesteps - 1}] for this model's schedule, got {args.timesteps!r}")
    if args.parts:
        print(f"{model.info.name} ({model.info.source}), {args.items} scenes, dense captions; "
              "error rise with each part wrong")
        columns = (*CAPTION_PARTS, "relation")
        print(f"{'t':>5} {'own':>9} " + " ".join(f"{p:>10}" for p in columns))
        for r in caption_part_use(model, args.items, timesteps):
            print(f"{r['t']:>5} {r['own']:9.5f} " + " ".join(f"{r[p]:>+9.1%} " for p in columns))
        return
    print(f"{model.info.name} ({model.info.source}), {args.items} scenes, {args.captions} captions")
    print(f"{'t':>5} {'own':>9} {'another':>9} {'empty':>9} {'gain vs another':>16} {'gain vs empty':>14}")
    for r in caption_use(model, args.items, args.captions, timesteps):
        print(f"{r['t']:>5} {r['own']:9.5f} {r['another']:9.5f} {r['empty']:9.5f} "
              f"{r['gain_vs_another']:16.3f} {r['gain_vs_empty']:14.3f}")


if __name__ == "__main__":
    main()
