"""How much a base model uses its captions, per noise level.

    python -m pipelines.bench.caption_use [--model PATH] [--items 32] [--captions short]

For fixed shapes scenes, noise and timesteps t, it prints the noise-prediction error with each
scene's own caption, another scene's caption and the empty caption, and two ratios:
  gain vs another: 1 - mse(own) / mse(another)   (does a wrong caption hurt?)
  gain vs empty:   1 - mse(own) / mse(empty)     (does the right caption help? classifier-free
                                                  guidance amplifies exactly this difference)
The training log's caption_gain is the first ratio averaged over random t. A model that has learned
its text shows a large gain vs empty at mid-to-high t (where layout and colour are decided).
Not part of the test suite.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import default_collate

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
    schedule = make_schedule(model.info.noise_schedule)
    conditions = {"own": (inputs["tokens"], inputs["mask"]),
                  "another": (inputs["tokens"].roll(1, 0), inputs["mask"].roll(1, 0)),
                  "empty": (empty.tokens, empty.mask)}
    rows = []
    for t in timesteps:
        tt = torch.full((items,), t, device=x0.device)
        x_t = schedule.q_sample(x0, tt, noise)
        mse = {name: ((model(x_t, tt, tokens, mask)[:, :3].float() - noise) ** 2).mean().item()
               for name, (tokens, mask) in conditions.items()}
        rows.append({"t": t, **mse, "gain_vs_another": 1 - mse["own"] / mse["another"],
                     "gain_vs_empty": 1 - mse["own"] / mse["empty"]})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="models folder or base model folder (default: the shipped models)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--captions", default="short", help="shapes caption form: mix | dense | short | short_bg")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = ModelStore(args.model, device=args.device, dtype=torch.float32).get("base")
    print(f"{model.info.name} ({model.info.source}), {args.items} scenes, {args.captions} captions")
    print(f"{'t':>5} {'own':>9} {'another':>9} {'empty':>9} {'gain vs another':>16} {'gain vs empty':>14}")
    for r in caption_use(model, args.items, args.captions):
        print(f"{r['t']:>5} {r['own']:9.5f} {r['another']:9.5f} {r['empty']:9.5f} "
              f"{r['gain_vs_another']:16.3f} {r['gain_vs_empty']:14.3f}")


if __name__ == "__main__":
    main()
