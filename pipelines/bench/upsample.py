"""How faithful the upsampler is to its input, by where it starts: shapes scenes are rendered at 64
(the input) and at 256 (the truth), upsampled, and scored.

    python -m pipelines.bench.upsample [--models PATH] [--scenes 12] [--device cpu] [--sheet PNG]

Columns: PSNR of the output against the true 256 render; the mean absolute difference (levels)
between the output shrunk back to 64 and the input; how many outputs the shapes detector reads
as the scene's objects (colour and shape); seconds per image. The baseline rows, in the same run,
are the reference setting (from pure noise over "fast27") and plain bicubic enlargement.
--sheet writes, for the first four scenes, rows of: the input (pixels enlarged), the reference
setting, the default setting, the true 256 render.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from PIL import Image

from .. import UpsamplePipeline, shapes
from ..base import ModelStore, upsampler_steps
from ..defaults import DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH
from ..io import atomic_save_png

SETTINGS = [  # (label, steps, sampler, strength)
    ("reference: from noise, fast27", "fast27", "ddim", 1.0),
    ("default", DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_STRENGTH),
    ("strength 0.25", DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_SAMPLER, 0.25),
    ("strength 0.6", DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_SAMPLER, 0.6),
    ("strength 0.4, ancestral", DEFAULT_UPSAMPLE_STEPS, "ddpm", 0.4),
]


def objects(spec) -> list:
    return sorted((o.color, o.shape) for o in spec.objects)


def score(outputs: list[np.ndarray], cases: list) -> tuple[float, float, int]:
    psnr, shrunk_diff, found = [], [], 0
    for out, (small, truth, _, spec) in zip(outputs, cases):
        o = out.astype(np.float32)
        psnr.append(10 * np.log10(255.0 ** 2 / ((o - truth) ** 2).mean()))
        shrunk_diff.append(np.abs(cv2.resize(o, small.shape[:2][::-1], interpolation=cv2.INTER_AREA) - small).mean())
        found += objects(shapes.detect(out)) == objects(spec)
    return float(np.mean(psnr)), float(np.mean(shrunk_diff)), found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="models folder (default: the shipped models)")
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--device", default=None)
    ap.add_argument("--sheet", default="", help="also write a comparison sheet (PNG) here")
    args = ap.parse_args(argv)

    up = UpsamplePipeline(ModelStore(args.models, device=args.device))
    cases = []
    for i in range(args.scenes):
        spec = shapes.random_scene(1000 + i)
        cases.append((shapes.render_array(spec, 64), shapes.render_array(spec, 256).astype(np.float32),
                      shapes.captions(spec)["dense"], spec))
    print(f"{args.scenes} shapes scenes, 64 -> 256")
    print(f"{'setting':32s} {'steps run':>9s} {'PSNR dB':>8s} {'|shrunk-in|':>11s} {'detector':>8s} {'s/image':>8s}")
    results = {}
    for label, steps, sampler, strength in SETTINGS:
        outputs, seconds = [], 0.0
        for k, (small, _, caption, _) in enumerate(cases):
            start = time.perf_counter()
            out = up(caption, Image.fromarray(small), num_inference_steps=steps, sampler=sampler,
                     strength=strength, seed=k)
            seconds += time.perf_counter() - start
            outputs.append(np.asarray(out.images[0]))
        results[label] = outputs
        n_steps = len(upsampler_steps(steps, strength)[0])
        psnr, diff, found = score(outputs, cases)
        print(f"{label:32s} {n_steps!s:>9s} {psnr:8.2f} {diff:11.2f} {found:>4d}/{args.scenes:<3d} "
              f"{seconds / len(cases):8.2f}", flush=True)
    bicubic = [cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC) for small, *_ in cases]
    psnr, diff, found = score(bicubic, cases)
    print(f"{'bicubic enlargement':32s} {'':>9s} {psnr:8.2f} {diff:11.2f} {found:>4d}/{args.scenes:<3d}")
    if args.sheet:
        rows = [np.concatenate([cv2.resize(small, (256, 256), interpolation=cv2.INTER_NEAREST),
                                results[SETTINGS[0][0]][i], results["default"][i], truth.astype(np.uint8)], axis=1)
                for i, (small, truth, _, _) in enumerate(cases[:4])]
        atomic_save_png(args.sheet, Image.fromarray(np.concatenate(rows, axis=0)))
        print(f"sheet (input | from noise, fast27 | default | true 256): {args.sheet}")


if __name__ == "__main__":
    main()
