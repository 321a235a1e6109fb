"""CLI: python -m pipelines.training pretrain|finetune-inpaint|upsampler [options]

Only the options given on the command line are passed on, so `--resume` keeps the checkpoint's
settings unless one is given again. Several GPUs or machines: launch with torchrun, e.g.
    torchrun --nproc_per_node=4 -m pipelines.training pretrain --out runs/base --batch-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .data import DataError
from .train import PRESETS, STAGE_DEFAULTS, STAGES, TrainConfig, run

STAGE_HELP = {
    "pretrain": "train a text-conditional base model from scratch (or --init); 20%% empty captions (GLIDE §4.2)",
    "finetune-inpaint": "widen a trained model by 4 zero-initialised input channels (masked image + mask) and "
                        "train it with random masks (GLIDE §4.3); needs --init FOLDER",
    "upsampler": "train the text-conditional 64->256 upsampler on pairs made by downsampling",
}

# (flag, field, help); the default shown is the stage's
OPTIONS = [
    ("--out", "out", "run folder (checkpoints, log.jsonl, samples, model/ export)"),
    ("--resume", "resume", "continue exactly from the run folder's checkpoint"),
    ("--init", "init", "warm start from an exported model folder (weights only, new optimizer)"),
    ("--overwrite", "overwrite", "start a new run even if --out holds a checkpoint"),
    ("--name", "name", "model name recorded in the export"),
    ("--preset", "preset", f"model preset: {', '.join(PRESETS)}"),
    ("--model-config", "model", "JSON of GlideConfig fields overriding the preset, e.g. '{\"num_channels\": 64}'"),
    ("--noise-schedule", "noise_schedule", "squaredcos_cap_v2 | linear ('' = the preset's)"),
    ("--tokenizer", "tokenizer", "an existing tokenizer.json ('' = build the shapes tokenizer)"),
    ("--data", "data", "'shapes' (generated on the fly) or a folder of images with captions "
                       "(image.png + image.txt, or captions.jsonl)"),
    ("--captions", "captions", "shapes caption form: mix | dense | short | short_bg, or weights of the mix's "
                               "forms (dense, short, short_bg, relational), e.g. 'dense=0.3,relational=0.5,short=0.2'"),
    ("--caption-drop", "caption_drop", "fraction of empty captions (classifier-free guidance)"),
    ("--offset-noise", "offset_noise", "scale of the per-image, per-channel noise offset (0 = plain noise; 0.1 "
                                       "lets backgrounds follow the caption when sampling starts below t = 999)"),
    ("--layout-noise", "layout_noise", "scale of per-image, per-channel noise on 2x2, 4x4 and 8x8 grids (0 = "
                                       "plain noise; 0.1 made backgrounds follow the caption; positions not yet)"),
    ("--timesteps", "timesteps", "training timesteps: uniform (GLIDE) | high (p(t) proportional to t + 1: more "
                                 "draws at the noise levels where the caption decides layout and colour)"),
    ("--min-timestep", "min_timestep", "draw training timesteps only from {this..T-1} (0 = all; 940 trains only "
                                       "where a 64 px object no longer shows in x_t; low t is forgotten fast)"),
    ("--high-noise-weight", "high_noise_weight", "weight each example's eps loss by min(1 / alpha-bar_t, this) "
                                                 "(1 = GLIDE's plain loss; 20 made colour, size and background "
                                                 "words count at high noise; positions not yet)"),
    ("--grounding-weight", "grounding_weight", "weight of a token-level grounding loss (TokenCompose): words "
                                               "that name an object are pushed to be attended where it is "
                                               "(0 = off; shapes data with a caption mix only)"),
    ("--min-image-size", "min_image_size", "folder data: skip images with a smaller short side (0 = size/2)"),
    ("--masks", "masks", "finetune-inpaint mask mix, e.g. 'box=0.3,ellipse=0.2,brush=0.25,outpaint=0.15,whole=0.1'"),
    ("--upsampler", "upsampler", "finetune-inpaint: the --init model is an upsampler (6 -> 10 channels)"),
    ("--seed", "seed", "seed of data, timesteps, noise and dropout"),
    ("--workers", "workers", "DataLoader worker processes (-1 = auto)"),
    ("--batch-size", "batch_size", "batch size per process"),
    ("--lr", "lr", "AdamW learning rate"),
    ("--train-only", "train_only", "train only parameters whose names start with these comma-separated "
                                   "prefixes, e.g. layout_from_text,layout_proj ('' = all)"),
    ("--warmup", "warmup", "linear learning-rate warm-up steps"),
    ("--lr-schedule", "lr_schedule", "after warm-up: constant | cosine | linear (decay from --lr to --lr-min)"),
    ("--lr-min", "lr_min", "learning rate at the end of the decay"),
    ("--lr-decay-steps", "lr_decay_steps", "steps the decay lasts after warm-up (0 = until --max-steps)"),
    ("--weight-decay", "weight_decay", "AdamW weight decay"),
    ("--grad-clip", "grad_clip", "gradient norm clip"),
    ("--ema-decay", "ema_decay", "EMA decay (capped by (1+s)/(10+s))"),
    ("--max-steps", "max_steps", "stop when the step count reaches this (0 = no limit); after --init of a model "
                                 "trained with the same stage, data and seed, the count goes on from its recorded "
                                 "step, so give that step plus the run's length"),
    ("--max-minutes", "max_minutes", "stop cleanly after this much wall time (0 = no limit)"),
    ("--checkpoint-every", "checkpoint_every", "checkpoint + export every N steps (and at the end)"),
    ("--checkpoint-shard-mb", "checkpoint_shard_mb", "split checkpoints into parts of at most this many MiB"),
    ("--export-every", "export_every", "export the EMA model folder every N steps (0 = with checkpoints)"),
    ("--log-every", "log_every", "progress line every N steps (every step's loss goes to log.jsonl)"),
    ("--sample-every", "sample_every", "sample grid every N steps and at the end (0 = never)"),
    ("--samples", "samples", "images per sample grid"),
    ("--sample-steps", "sample_steps", "DPM-Solver++ steps for the sample grids"),
    ("--guidance", "guidance", "classifier-free guidance scale for the sample grids"),
    ("--device", "device", "auto | cpu | cuda | cuda:N"),
    ("--precision", "precision", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16"),
    ("--compile", "compile", "torch.compile the model"),
    ("--channels-last", "channels_last", "channels_last memory format"),
    ("--quiet", "quiet", "no progress lines"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    defaults = TrainConfig()
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for stage in STAGES:
        p = sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage],
                           argument_default=argparse.SUPPRESS)
        for flag, name, text in OPTIONS:
            if name in ("masks", "upsampler") and stage != "finetune-inpaint":
                continue
            default = STAGE_DEFAULTS[stage].get(name, getattr(defaults, name))
            if isinstance(default, bool):
                p.add_argument(flag, dest=name, action="store_true", help=text)
                continue
            kind = {"int": int, "float": float}.get(str(types[name]), str)
            shown = "{}" if name == "model" else repr(default)
            p.add_argument(flag, dest=name, type=kind, help=f"{text} (default: {shown})".replace("%", "%%"))
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    try:
        result = run(stage, **args)
    except (ValueError, FileNotFoundError, FileExistsError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.stop_reason else 1


if __name__ == "__main__":
    sys.exit(main())
