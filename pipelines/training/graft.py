"""Carry a base model's further training over to a model fine-tuned from it, without retraining.

When the base is trained on (old -> new), the inpainting model widened from the old base falls
behind: it keeps the old base's text reading. Adding the base's weight change to it,
    grafted = target + (new_base - old_base)
("task arithmetic", Ilharco et al. 2023) works because both fine-tunes stay close to the weights
they started from. On the shapes benchmark it carried the CPU-fine-tuned base's update over to
the H100 base-inpaint (measured in the README's "The shipped models and measured figures").

The target may be a widened (inpainting) copy of the base: its first convolution's extra input
columns get no update, the image (and low-res) columns get the base's, as `widen_for_inpainting`
maps them.

    python -m pipelines.training.graft --target assets/models/base-inpaint \
        --old-base runs/base-h100 --new-base assets/models/base --out runs/base-inpaint-graft
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..checkpoints import TOKENIZER_FILE, CheckpointError, load_model, save_model
from .widen import widen_first_conv

METHOD = "target + (new_base - old_base), the first conv's image columns only"


def _tokenizer_file(model) -> Path | None:
    path = Path(model.info.source) / TOKENIZER_FILE
    return path if model.info.tokenizer is not None and path.is_file() else None


def graft_update(target, old_base, new_base, out, name: str | None = None, dtype=torch.float16) -> Path:
    """Write `target + (new_base - old_base)` as a model folder at `out` (computed in fp32, stored
    in `dtype` as the shipped models are); returns `out`."""
    t, old, new = (load_model(p, device="cpu", dtype=torch.float32) for p in (target, old_base, new_base))
    if old.config != new.config:
        raise CheckpointError(f"{old_base} and {new_base} have different configs; both must be the same "
                              "architecture (the base before and after its further training)")
    if t.config not in (old.config, dataclasses.replace(old.config, inpaint=True)):
        raise CheckpointError(f"{target} is not the base's architecture (nor its inpainting widening), "
                              f"so the base's update cannot be added to it")
    if not (t.info.noise_schedule == old.info.noise_schedule == new.info.noise_schedule):
        raise CheckpointError("the three models use different noise schedules")
    tokenizer_files = [_tokenizer_file(m) for m in (t, old, new)]
    if len({f.read_bytes() if f else None for f in tokenizer_files}) != 1:
        raise CheckpointError("the three models have different tokenizers; token ids would not match")
    old_state, new_state = old.state_dict(), new.state_dict()
    with torch.no_grad():
        for key, weight in t.state_dict().items():
            if not weight.is_floating_point():
                continue
            delta = new_state[key] - old_state[key]
            if weight.shape != delta.shape:  # widened first conv: the inpainting columns get no update
                delta = widen_first_conv(delta, t.config)
            weight += delta
    record = {"stage": "graft", "method": METHOD, "data": None, "steps": None,
              **{role: {"path": str(path), "training": m.info.training or None}
                 for role, path, m in (("target", target, t), ("old_base", old_base, old),
                                       ("new_base", new_base, new))}}
    save_model(t, out, noise_schedule=t.info.noise_schedule, tokenizer_file=tokenizer_files[0], training=record,
               name=name or t.info.name, dtype=dtype)
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.training.graft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="model folder fine-tuned from the old base (e.g. base-inpaint)")
    ap.add_argument("--old-base", required=True, help="the base the target was fine-tuned from")
    ap.add_argument("--new-base", required=True, help="the same base after further training")
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--name", default=None, help="model name recorded in the export (default: the target's)")
    args = ap.parse_args(argv)
    try:
        out = graft_update(args.target, args.old_base, args.new_base, args.out, args.name)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
