"""Command line: python -m pipelines generate|inpaint|sdedit|upsample|replay ...

Examples
  python -m pipelines generate --prompt "a red circle" --seed 1 --out out.png
  python -m pipelines inpaint --image in.png --mask m.png --prompt "a blue star" [--mode replace]
  python -m pipelines sdedit --image sketch.png --prompt "a green triangle" --strength 0.8
  python -m pipelines upsample --image small.png --prompt "a red circle"
  python -m pipelines replay SCENE_DIR

Images are written atomically as PNG with the call's parameters (JSON) in the "parameters" text
chunk; the parameters are also printed with --json. Bad input: a one-line error, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INPAINT, DEFAULT_GUIDANCE_MIN_T,
                       DEFAULT_GUIDANCE_MIN_T_INPAINT, DEFAULT_MASK_BLUR, DEFAULT_PADDING, DEFAULT_SAMPLER,
                       DEFAULT_SDEDIT_STRENGTH, DEFAULT_STEPS, DEFAULT_STEPS_INPAINT, DEFAULT_UPSAMPLE_SAMPLER,
                       DEFAULT_UPSAMPLE_SAMPLER_INPAINT, DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH,
                       DEFAULT_UPSAMPLE_TEMPERATURE, SAMPLERS, steps_from_text)


def _common(p: argparse.ArgumentParser, *, guidance: float | None, steps: int | str = DEFAULT_STEPS,
            sampler: str = DEFAULT_SAMPLER, guidance_min_t: int | None = DEFAULT_GUIDANCE_MIN_T) -> None:
    """guidance_min_t None: the pipeline picks it (inpainting: by --mode and --strength)."""
    g = p.add_argument_group("model and sampling")
    g.add_argument("--models", default=None, help="models folder, model folder or released GLIDE .pt "
                   "(default: the shipped models, or $STUDIO_MODELS_DIR)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    g.add_argument("--steps", type=steps_from_text, default=steps,
                   help=f"sampling steps: an int or a respacing string like 100, fast27, ddim25 (default {steps})")
    g.add_argument("--sampler", default=sampler, choices=SAMPLERS, help=f"default {sampler}")
    if guidance is not None:
        g.add_argument("--guidance-scale", type=float, default=guidance,
                       help=f"classifier-free guidance scale (default {guidance})")
        shown = guidance_min_t if guidance_min_t is not None else (
            f"{DEFAULT_GUIDANCE_MIN_T_INPAINT} with --mode finetuned and --strength 1, else {DEFAULT_GUIDANCE_MIN_T}")
        g.add_argument("--guidance-min-t", type=int, default=guidance_min_t,
                       help=f"guidance only at timesteps t >= this, 0 = every step (default {shown})")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--out", default="out.png", help="output PNG; several images get _1, _2 ... suffixes")
    g.add_argument("--json", action="store_true", help="print the parameters (for replay) as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _prompt(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--prompt", required=required, default="", help="what the image should show")
    p.add_argument("--negative-prompt", default="", help="guide away from this (default: the empty prompt)")


def _upsample_args(p: argparse.ArgumentParser, sampler: str, auto: bool) -> None:
    g = p.add_argument_group("upsampler")
    if auto:
        g.add_argument("--upsample", dest="upsample", action="store_true", default=None,
                       help="force the upsampler stage (default: automatic)")
    g.add_argument("--no-upsample", dest="upsample", action="store_false",
                   **({} if auto else {"default": True}), help="stay at the base resolution")
    g.add_argument("--upsample-steps", type=steps_from_text, default=DEFAULT_UPSAMPLE_STEPS)
    g.add_argument("--upsample-sampler", default=sampler, choices=SAMPLERS)
    g.add_argument("--upsample-temperature", type=float, default=DEFAULT_UPSAMPLE_TEMPERATURE)
    g.add_argument("--upsample-strength", type=float, default=DEFAULT_UPSAMPLE_STRENGTH,
                   help="start the upsampler part-way from the enlarged base image: 1 = from pure noise "
                        f"(default {DEFAULT_UPSAMPLE_STRENGTH})")


def _mask_args(p: argparse.ArgumentParser, strength: float) -> None:
    p.add_argument("--strength", type=float, default=strength, help=f"0 = unchanged .. 1 = from noise (default {strength})")
    p.add_argument("--mask-blur", type=float, default=DEFAULT_MASK_BLUR,
                   help=f"feather band inside the mask edge, px (default {DEFAULT_MASK_BLUR})")
    p.add_argument("--padding", type=int, default=DEFAULT_PADDING,
                   help=f"context px around the mask in the working crop (default {DEFAULT_PADDING})")


def _edit_command(sub, name: str, help: str, *, mask_required: bool, mask_help: str, strength: float,
                  guidance: float, steps: int | str, upsample_sampler: str,
                  guidance_min_t: int | None = DEFAULT_GUIDANCE_MIN_T) -> argparse.ArgumentParser:
    """The arguments inpaint and sdedit share: an image, a mask, a prompt, the mask and sampling
    options and an automatic upsampler stage."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=mask_required, default=None, help=mask_help)
    _prompt(p)
    _mask_args(p, strength)
    _common(p, guidance=guidance, steps=steps, guidance_min_t=guidance_min_t)
    _upsample_args(p, upsample_sampler, auto=True)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="text to image (base + upsampler)")
    _prompt(p)
    _common(p, guidance=DEFAULT_GUIDANCE)
    _upsample_args(p, DEFAULT_UPSAMPLE_SAMPLER, auto=False)

    p = _edit_command(sub, "inpaint", "regenerate the white part of a mask", mask_required=True,
                      mask_help="white = regenerate, black = keep", strength=1.0, guidance=DEFAULT_GUIDANCE_INPAINT,
                      steps=DEFAULT_STEPS_INPAINT, upsample_sampler=DEFAULT_UPSAMPLE_SAMPLER_INPAINT,
                      guidance_min_t=None)
    p.add_argument("--mode", choices=["finetuned", "replace"], default="finetuned",
                   help="finetuned: the inpainting model; replace: any model, known region replaced each step")

    _edit_command(sub, "sdedit", "turn a sketch (strokes over an image or a blank canvas) into an image",
                  mask_required=False, mask_help="optional: only the white part changes",
                  strength=DEFAULT_SDEDIT_STRENGTH,
                  guidance=DEFAULT_GUIDANCE, steps=DEFAULT_STEPS, upsample_sampler=DEFAULT_UPSAMPLE_SAMPLER)

    p = sub.add_parser("upsample", help="64x64 → 256x256 with the text-conditional upsampler")
    p.add_argument("--image", required=True)
    _prompt(p)
    p.add_argument("--temperature", type=float, default=DEFAULT_UPSAMPLE_TEMPERATURE)
    p.add_argument("--strength", type=float, default=DEFAULT_UPSAMPLE_STRENGTH,
                   help="start part-way from the enlarged image: 1 = from pure noise "
                        f"(default {DEFAULT_UPSAMPLE_STRENGTH})")
    _common(p, guidance=None, steps=DEFAULT_UPSAMPLE_STEPS, sampler=DEFAULT_UPSAMPLE_SAMPLER)

    p = sub.add_parser("replay", help="re-run a saved scene and report which nodes reproduce bit-exactly")
    p.add_argument("scene", help="scene folder (scene.json + images/)")
    p.add_argument("--models", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quiet", action="store_true")
    return parser


class _Bar:
    """tqdm when available, else a one-line text bar on stderr."""

    def __init__(self, quiet: bool, desc: str):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, step: int, total: int, _preview=None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(step + 1 - self.bar.n)
        else:
            done = int(30 * (step + 1) / max(total, 1))
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {step + 1}/{total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.bar is False:
            print(file=sys.stderr)


def _save(result, out: str, as_json: bool) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .io import atomic_save_png

    out_path = Path(out)
    for i, image in enumerate(result.images):
        path = out_path if i == 0 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix or '.png'}")
        info = PngInfo()
        info.add_text("parameters", json.dumps(result.params, sort_keys=True))
        atomic_save_png(path, image, pnginfo=info)
        extra = ""
        if result.changed_outside_mask is not None:
            extra = f", {result.changed_outside_mask[i]} pixels changed outside the mask"
        print(f"wrote {path} ({image.width}x{image.height}, seed {result.params['seed']}{extra})")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if as_json:
        print(json.dumps(result.params, indent=2, sort_keys=True))


def _run(args) -> int:
    from . import InpaintPipeline, ModelStore, Scene, SDEditPipeline, Text2ImagePipeline, UpsamplePipeline

    store = ModelStore(args.models, args.device, args.dtype)
    if args.command == "replay":
        scene = Scene.load(args.scene)
        for w in scene.warnings:
            print(f"warning: {w}", file=sys.stderr)

        def progress(i, n, node_id):
            if not args.quiet and node_id:
                print(f"[{i + 1}/{n}] {node_id} {scene[node_id].label}", file=sys.stderr)

        report = scene.replay(store, progress=progress)
        for r in report:
            status = "reproduced" if r.reproduced else ("FAILED" if r.max_abs_diff is None else "differs")
            detail = f" (max abs diff {r.max_abs_diff})" if r.max_abs_diff else ""
            err = f": {report.errors[r.node_id]}" if r.node_id in report.errors else ""
            print(f"{r.node_id} {scene[r.node_id].op:9s} {status}{detail}{err}")
        ok = sum(r.reproduced for r in report)
        print(f"{ok}/{len(report)} nodes reproduce bit-exactly on this device")
        return 0 if report.all_reproduced else 1

    bar = _Bar(args.quiet, args.command)
    common = dict(seed=args.seed, num_images=args.num_images, num_inference_steps=args.steps, sampler=args.sampler,
                  callback_on_step_end=bar)
    try:
        if args.command == "generate":
            result = Text2ImagePipeline(store)(
                args.prompt, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                guidance_min_t=args.guidance_min_t, upsample=args.upsample, upsample_steps=args.upsample_steps,
                upsample_sampler=args.upsample_sampler, upsample_temperature=args.upsample_temperature,
                upsample_strength=args.upsample_strength, **common)
        elif args.command in ("inpaint", "sdedit"):
            kw = dict(negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                      guidance_min_t=args.guidance_min_t, strength=args.strength, mask_blur=args.mask_blur,
                      padding=args.padding, upsample=args.upsample, upsample_steps=args.upsample_steps,
                      upsample_sampler=args.upsample_sampler, upsample_temperature=args.upsample_temperature,
                      upsample_strength=args.upsample_strength, **common)
            if args.command == "inpaint":
                result = InpaintPipeline(store)(args.prompt, args.image, args.mask, mode=args.mode, **kw)
            else:
                result = SDEditPipeline(store)(args.prompt, args.image, mask_image=args.mask, **kw)
        else:
            result = UpsamplePipeline(store)(args.prompt, args.image, temperature=args.temperature,
                                             strength=args.strength, **common)
    finally:
        bar.close()
    _save(result, args.out, args.json)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .base import GenerationInterrupted

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        # ValueError covers CheckpointError, ImageInputError, PipelineInputError, SceneError, NaN output
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, GenerationInterrupted):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
