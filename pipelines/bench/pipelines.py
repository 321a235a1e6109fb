"""Seconds per image of each pipeline on a models folder (default: the shipped models), and peak memory.

    python -m pipelines.bench.pipelines [--models PATH] [--device cpu] [--repeat 3] [--threads N]

Each row runs a pipeline call `--repeat` times after one warm-up call (models load in the warm-up)
and prints the median. The baseline, measured in the same run, is the released GLIDE notebooks'
setting (100 ancestral DDPM steps for the base model); the ratio line says how much faster the
default setting is. Peak memory is the process's maximum resident set size after all three models
are loaded and every pipeline has run (what the studio holds with the default models).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image

from .. import InpaintPipeline, SDEditPipeline, Text2ImagePipeline, UpsamplePipeline
from ..base import ModelStore
from ..defaults import DEFAULT_SAMPLER, DEFAULT_SDEDIT_STRENGTH, DEFAULT_STEPS, DEFAULT_STEPS_INPAINT
from ..shapes import inpaint_case, render, random_scene


def median_seconds(call, repeat: int) -> float:
    call()  # warm-up: loads the models, fills caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="models folder (default: the shipped models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    store = ModelStore(args.models, device=args.device)
    t2i, inpaint = Text2ImagePipeline(store), InpaintPipeline(store)
    sdedit, upsample = SDEditPipeline(store), UpsamplePipeline(store)
    image, mask, prompt, _ = inpaint_case(7, size=64)
    scene = render(random_scene(3), size=64)
    blob = Image.fromarray(np.full((64, 64, 3), 222, np.uint8))

    def t2i_64(**kw):
        return t2i(prompt="a red circle", seed=0, upsample=False, **kw)

    def inpaint_64(**kw):
        return inpaint(prompt=prompt, image=image, mask_image=mask, seed=0, **kw)

    rows = [
        ("text-to-image 64 (default)", t2i_64),
        ("text-to-image 64 (GLIDE notebook: ddpm 100)", lambda: t2i_64(sampler="ddpm", num_inference_steps="100")),
        ("text-to-image 64 (25 evenly spaced, with t=999)", lambda: t2i_64(num_inference_steps=25)),
        ("text-to-image 64 (guidance at every step)", lambda: t2i_64(guidance_min_t=0)),
        ("text-to-image 64 (ddim10, the faster choice)", lambda: t2i_64(num_inference_steps="ddim10")),
        ("text-to-image 64 -> 256 (default)", lambda: t2i(prompt="a red circle", seed=0)),
        ("inpaint 64, fine-tuned (default)", inpaint_64),
        ("inpaint 64, fine-tuned, guidance at t >= 900", lambda: inpaint_64(guidance_min_t=900)),
        ("inpaint 64, replace", lambda: inpaint_64(mode="replace")),
        (f"sdedit 64, strength {DEFAULT_SDEDIT_STRENGTH}",
         lambda: sdedit(prompt="a green triangle", image=blob, strength=DEFAULT_SDEDIT_STRENGTH, seed=0)),
        ("upsample 64 -> 256 (default)", lambda: upsample(prompt="a red circle", image=scene, seed=0)),
    ]
    print(f"device {args.device}, {torch.get_num_threads()} threads, default sampler {DEFAULT_SAMPLER} "
          f"{DEFAULT_STEPS} steps ({DEFAULT_STEPS_INPAINT} for inpainting), median of {args.repeat}")
    results = {}
    for name, call in rows:
        results[name] = median_seconds(call, args.repeat)
        print(f"  {name:<46} {results[name]:7.2f} s/image", flush=True)
    baseline, default = results["text-to-image 64 (GLIDE notebook: ddpm 100)"], results["text-to-image 64 (default)"]
    print(f"default text-to-image vs the GLIDE notebook setting: {baseline / default:.1f}x faster")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory with all models loaded: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
