"""The training loop for the three stages (nanoGPT's train.py layout: defaults -> small functions -> one loop).

    pretrain          text-conditional base model from scratch; 20% empty captions (GLIDE §4.2)
    finetune-inpaint  widen a trained model's first conv by 4 zero-initialised channels and train
                      with random masks, the masked image + mask as extra input (GLIDE §4.3)
    upsampler         the text-conditional 64 -> 256 upsampler on pairs made by downsampling

Loss: Improved DDPM's L_hybrid = L_simple + L_vlb (pipelines.diffusion.training_losses), t uniform
(or --timesteps high: p(t) proportional to t + 1; --min-timestep m keeps only t >= m);
--high-noise-weight C weights L_simple by min(1 / alpha-bar_t, C).

A run folder (`--out`):
    run.json            the run's options            log.jsonl        one JSON record per step + events
    tokenizer.json      the prompt tokenizer          data_report.json used / skipped files (folder data)
    checkpoint.json     manifest -> ckpt-<step>.pt (or .pt.partNNN shards): model, EMA, optimizer, step,
                        data position, RNG states, configs; loads with torch.load(weights_only=True)
    model/              the EMA weights exported for pipelines.load_model (fp16 safetensors + config.json
                        + tokenizer.json + the training record)
    samples/            sample grids (PNG + captions)

Resuming: `--resume` restores everything from the checkpoint. Sample i of a run is a pure function of
(seed, i) and step s's timesteps/noise/dropout of (seed, s, rank), so a resumed run reproduces the
uninterrupted one bit for bit on CPU. `--init FOLDER` warm-starts from an exported model folder
(weights only, new optimizer); when that folder came from the same stage, data and seed, the data
position and counters continue, so chained short GPU runs do not repeat data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import default_collate

from .. import shapes
from ..checkpoints import CONFIG_FILE, load_model, parse_device, read_model_config, save_model
from ..diffusion import classifier_free_guidance, grounding_loss, make_schedule, respace, sample, training_losses
from ..io import atomic_save_png, atomic_write_bytes, atomic_write_json
from ..models.glide import AttentionBlock, GlideConfig, GlideUNet
from ..tokenizer import PromptTokenizer
from .data import FolderSource, TrainingDataset, derived_seed, make_loader, make_source
from .masks import parse_weights
from .widen import GROWABLE, grow_zero_initialised_parts, widen_for_inpainting

STAGES = ("pretrain", "finetune-inpaint", "upsampler")
CHECKPOINT_MANIFEST = "checkpoint.json"
CHECKPOINT_FORMAT = "pipelines.training/1"
MODEL_DIR = "model"
TOKENIZER = "tokenizer.json"
LOG = "log.jsonl"

# -----------------------------------------------------------------------------
# Defaults

# The shipped models (docs/architecture.md). n_vocab is set from the tokenizer.
PRESETS: dict[str, dict] = {
    "base": dict(image_size=64, num_channels=32, channel_mult="1,2,3,4", num_res_blocks=2,
                 attention_resolutions="16,8", num_head_channels=32, xf_width=128, xf_layers=3, xf_heads=4,
                 text_ctx=48),
    "upsampler": dict(image_size=256, num_channels=32, channel_mult="1,1,2,2,4,4", num_res_blocks=1,
                      attention_resolutions="8", num_head_channels=64, resblock_updown=False, xf_width=128,
                      xf_layers=3, xf_heads=4, text_ctx=48, super_res=True),
    # tiny configs for tests and smoke runs (seconds on a CPU)
    "tiny": dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
                 num_head_channels=32, xf_width=32, xf_layers=1, xf_heads=2, text_ctx=48),
    "tiny-upsampler": dict(image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=1,
                           attention_resolutions="16", num_head_channels=32, resblock_updown=False, xf_width=32,
                           xf_layers=1, xf_heads=2, text_ctx=48, super_res=True),
}
TIMESTEP_SAMPLING = ("uniform", "high")
LR_SCHEDULES = ("constant", "cosine", "linear")
# GLIDE: cosine schedule for the base model, linear for the upsampler
PRESET_SCHEDULES = {"base": "squaredcos_cap_v2", "tiny": "squaredcos_cap_v2",
                    "upsampler": "linear", "tiny-upsampler": "linear"}
UPSAMPLE_FACTOR = 4  # 64 -> 256, as GLIDE


@dataclass
class TrainConfig:
    # run folder
    out: str = "runs/base"
    resume: bool = False  # continue exactly from out/checkpoint.json
    init: str = ""  # warm start from an exported model folder (weights only, new optimizer)
    overwrite: bool = False  # allow starting a new run in a folder that holds a checkpoint
    name: str = ""  # model name in the export; "" = base / base-inpaint / upsampler / ...
    # model
    preset: str = "base"  # a PRESETS key (ignored with --init / --resume)
    model: dict = field(default_factory=dict)  # GlideConfig fields overriding the preset
    noise_schedule: str = ""  # "" = the preset's (cosine for base, linear for the upsampler)
    tokenizer: str = ""  # an existing tokenizer.json; "" = build the shapes tokenizer
    # data
    data: str = "shapes"  # "shapes" or a folder of captioned images
    captions: str = "mix"  # shapes: mix | dense | short | short_bg | "dense=0.3,relational=0.5" (form weights)
    caption_drop: float = 0.2  # GLIDE §4.2: 20% empty captions for classifier-free guidance
    # "Offset noise" (Guttenberg 2023): the training noise gets offset_noise * N(0, 1) more per image and
    # channel. Why: samplers start from zero-mean noise at a kept t < 999 (ddim15: t = 938, alpha-bar 0.009)
    # where a model trained on plain noise reads the image's mean colour off x_t, so it draws every
    # background mid-grey (measured on the first shipped base); with the offset that mean is noise to it.
    offset_noise: float = 0.0
    # "Layout noise": offset noise one octave at a time. The training noise also gets layout_noise * N(0, 1)
    # drawn on 2x2, 4x4 and 8x8 grids and enlarged bilinearly, per image and channel. Why: the shipped
    # base ignores its captions' position and background words (a caption with them wrong raised its error
    # by under 1%, bench.caption_use --parts), because at every t it trains on, x_t still shows where the
    # objects and the background are; with this noise the coarse layout of x_t is noise at high t, so only
    # the caption can tell it; at mid t the image outweighs it, as it does offset noise.
    layout_noise: float = 0.0
    # Which timesteps a batch trains on: "uniform" (GLIDE, Improved DDPM) or "high", p(t) proportional to
    # t + 1 (twice the average density at t = T). Why: a caption decides layout and colour only at high
    # noise, where uniform draws put few samples and the eps loss is small; on the tiny preset (2,500
    # steps x 32) a caption lowered the error 3x as much at t = 850 with "high" (README).
    timesteps: str = "uniform"
    # Draw training timesteps only from {min_timestep..T-1} (0 = all). Why: at 64 px a medium object still
    # shows in x_t up to t ~ 940 (its pixels' signal-to-noise is about 2.5 there), so below that a caption's
    # position words barely lower the loss; a leg at 940 puts every example where they would count. Measured
    # (session 20, docs/models.md): such a leg cut the error at t = 980-990 by half, but left positions
    # unread, and it forgets low t fast (error at t = 100 36x in 1,200 steps), so it needs a full-range leg after.
    min_timestep: int = 0
    # Weight of each example's L_simple: min(1 / alpha-bar_t, high_noise_weight) (1 = GLIDE's plain eps loss).
    # Why: an eps error is SNR(t) times the x0 error behind it, so at the noise levels where x_t no longer
    # shows where objects sit (t >= 850, SNR < 0.06) a model that puts them in the wrong place costs almost
    # nothing, and the bases up to session 18 never learnt their captions' position words (bench.caption_use --parts).
    # 1 / alpha-bar = 1 + 1 / SNR makes the loss the v-prediction loss (Salimans & Ho 2022) up to the cap,
    # which keeps eps errors at t near T, where 1 / alpha-bar explodes, from swamping the rest. Measured
    # (session 19, docs/models.md): 20 made colour, size and background words count several times more at
    # t = 700-950; position words stayed unread, with 100 too.
    high_noise_weight: float = 1.0
    # Weight of a token-level grounding loss (TokenCompose, Wang et al. 2024; 0 = off; shapes data only): each
    # word that names an object (its size, colour, shape, and its cell's name) should be attended where that
    # object is, in every attention layer (diffusion.grounding_loss). Why: the bases bind colours to shapes
    # poorly (SDEdit blobs and pairs swap them) and read no relation word, and their text encoders hardly say
    # which side of a relation an object is on (a probe: chance for the tiny models, 70% at 64 px; session 24,
    # docs/models.md); the masks the shapes world renders tell the attention where each named object is.
    grounding_weight: float = 0.0
    min_image_size: int = 0  # folder data: skip images smaller than this (0 = image_size // 2)
    masks: str = ""  # finetune-inpaint mask mix, e.g. "box=0.3,ellipse=0.2,brush=0.25,outpaint=0.15,whole=0.1"
    upsampler: bool = False  # finetune-inpaint: the --init model must be an upsampler (6 -> 10 channels)
    seed: int = 0
    workers: int = -1  # DataLoader worker processes; -1 = auto (0 on CPU, up to 12 with CUDA)
    # optimisation
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    lr: float = 3e-4  # why 3e-4 (not GLIDE's 1e-4): small models from scratch tolerate and need more
    warmup: int = 500  # linear warm-up steps, then --lr-schedule
    # After warm-up: "constant", or a "cosine" / "linear" decay from lr to lr_min over lr_decay_steps
    # (0 = until --max-steps), then lr_min. Why: at a constant lr the batch-16 CPU rounds plateaued, and
    # an 18-minute leg at a third of the lr moved every benchmark score (README, fifth round).
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_decay_steps: int = 0
    weight_decay: float = 0.0
    # Train only the parameters whose names start with one of these comma-separated prefixes; the rest stay
    # as loaded ("" = all). Why: a part grown onto a trained model (text_layout) can be taught first without
    # the rest forgetting what it knew, at the cost of the forward pass and part of the backward only.
    train_only: str = ""
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # capped by (1 + s) / (10 + s), so short runs still average sensibly
    max_steps: int = 0  # 0 = no limit (stop with --max-minutes, Ctrl-C or SIGTERM)
    max_minutes: float = 0.0  # stop cleanly (checkpoint + export) after this much wall time
    # checkpoints, exports, logs, samples
    checkpoint_every: int = 1000
    checkpoint_shard_mb: float = 0.0  # split the checkpoint into parts of at most this many MiB (0 = one file)
    export_every: int = 0  # also export the EMA model folder every N steps (0 = with each checkpoint)
    log_every: int = 10  # progress line + log flush (the loss of every step is logged)
    sample_every: int = 1000  # sample grid every N steps and at the end (0 = never)
    samples: int = 8
    sample_steps: int = 25  # DPM-Solver++(2M) steps for the grids
    guidance: float = 3.0  # classifier-free guidance scale for the grids (1 for an upsampler)
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the training model
    channels_last: bool = False
    quiet: bool = False  # no progress lines on stdout

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STAGE_DEFAULTS: dict[str, dict] = {
    "pretrain": dict(out="runs/base", preset="base"),
    "finetune-inpaint": dict(out="runs/base-inpaint", lr=1e-4, warmup=200),
    "upsampler": dict(out="runs/upsampler", preset="upsampler", batch_size=8),
}
# Options a resumed run must keep: they decide the model, which data each step sees and what the optimizer holds.
LOCKED_ON_RESUME = ("preset", "model", "init", "data", "captions", "caption_drop", "min_image_size", "masks",
                    "seed", "batch_size", "noise_schedule", "tokenizer", "upsampler", "train_only")


@dataclass
class RunResult:
    out: str
    model_dir: str  # the exported EMA model folder (pipelines.load_model reads it)
    checkpoint: str  # the checkpoint manifest
    stage: str
    step: int
    images_seen: int
    final_loss: float  # exponential moving average of the training loss
    stop_reason: str  # max_steps | max_minutes | signal | stop_event
    wall_time_s: float
    images_per_s: float
    skipped: list = field(default_factory=list)  # folder data: (path, reason)


# -----------------------------------------------------------------------------
# Small functions


def resolve_config(stage: str, options: dict) -> tuple[TrainConfig, dict | None]:
    """Defaults <- stage defaults <- (checkpoint's run options when resuming) <- explicit options."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
    options = dict(options)
    if isinstance(options.get("model"), str):  # the CLI passes --model-config as JSON
        try:
            options["model"] = json.loads(options["model"]) if options["model"] else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config is not valid JSON ({e}); e.g. '{{\"num_channels\": 64}}'") from e
    if not isinstance(options.get("model", {}), dict):
        raise ValueError(f"--model-config must be a JSON object such as '{{\"num_channels\": 64}}', "
                         f"got {options['model']!r}")
    merged = {**STAGE_DEFAULTS[stage], **options}
    checkpoint = None
    if options.get("resume"):
        checkpoint = load_checkpoint(merged["out"])
        if checkpoint["stage"] != stage:
            raise ValueError(f"{merged['out']} holds a {checkpoint['stage']!r} run; resume it with that stage")
        saved = checkpoint["run_config"]
        for key in LOCKED_ON_RESUME:
            if key in options and options[key] != saved[key]:
                raise ValueError(f"--{key.replace('_', '-')} {options[key]!r} differs from the checkpoint's "
                                 f"{saved[key]!r}; a resumed run must keep it (start a new run, or use --init)")
        merged = {**{k: v for k, v in saved.items() if k in known}, **options}
    cfg = TrainConfig(**merged)
    check_numbers(cfg)
    if stage == "finetune-inpaint":
        parse_weights(cfg.masks)  # a bad mix is refused before a model loads
    if cfg.grounding_weight and (cfg.data != "shapes" or ("=" not in cfg.captions and cfg.captions != "mix")):
        raise ValueError("--grounding-weight needs the shapes world's object masks and word spans: --data shapes "
                         "with --captions mix or form weights such as 'dense=1'")
    if stage == "finetune-inpaint" and not cfg.init and checkpoint is None:
        raise ValueError("finetune-inpaint needs --init FOLDER: the trained base (or upsampler) model to widen")
    if cfg.init and checkpoint is None and not (Path(cfg.init) / CONFIG_FILE).is_file():
        hint = f"; use its folder, {Path(cfg.init).parent}" if Path(cfg.init).is_file() else ""
        raise ValueError(f"--init {cfg.init} is not a model folder ({CONFIG_FILE} + weights, e.g. runs/base/model)"
                         f"{hint}")
    return cfg, checkpoint


def check_numbers(cfg: TrainConfig) -> None:
    """Refuse option values that would train wrongly in silence (a negative clip flips every
    gradient, a NaN EMA decay exports NaN weights, --checkpoint-every 0 saves nothing until the end)."""
    def flag(name):
        return f"--{name.replace('_', '-')}"

    for name in ("batch_size", "log_every", "checkpoint_every", "samples", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "max_minutes", "warmup", "export_every", "sample_every", "checkpoint_shard_mb",
                 "lr_decay_steps"):
        if not 0 <= getattr(cfg, name) < float("inf"):  # NaN fails too
            raise ValueError(f"{flag(name)} must be 0 or more, got {getattr(cfg, name)}")
    if not 0.0 < cfg.lr <= 1.0:
        raise ValueError(f"--lr must be a positive learning rate such as 1e-4, got {cfg.lr}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if not 0.0 <= cfg.lr_min <= cfg.lr:
        raise ValueError(f"--lr-min must be in [0, --lr] = [0, {cfg.lr:g}], got {cfg.lr_min}")
    if not 0.0 < cfg.grad_clip < float("inf"):
        raise ValueError(f"--grad-clip must be a positive gradient norm (1.0 is usual), got {cfg.grad_clip}")
    if not 0.0 <= cfg.guidance <= 100.0:
        raise ValueError(f"--guidance must be in [0, 100] (3 is usual), got {cfg.guidance}")
    if not 0.0 <= cfg.weight_decay < 1.0:
        raise ValueError(f"--weight-decay must be in [0, 1), got {cfg.weight_decay}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1) (0.9999 is usual), got {cfg.ema_decay}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if not 0.0 <= cfg.caption_drop <= 1.0:
        raise ValueError(f"--caption-drop is a fraction in [0, 1], got {cfg.caption_drop}")
    if cfg.timesteps not in TIMESTEP_SAMPLING:
        raise ValueError(f"--timesteps must be one of {', '.join(TIMESTEP_SAMPLING)}, got {cfg.timesteps!r}")
    if not 0.0 <= cfg.offset_noise <= 1.0:
        raise ValueError(f"--offset-noise is a noise scale in [0, 1] (0.1 is usual), got {cfg.offset_noise}")
    if not 0.0 <= cfg.layout_noise <= 1.0:
        raise ValueError(f"--layout-noise is a noise scale in [0, 1] (0.1 is usual), got {cfg.layout_noise}")
    if not 0.0 <= cfg.grounding_weight <= 10.0:
        raise ValueError(f"--grounding-weight must be in [0, 10] (0 = off, 0.05 is usual), got {cfg.grounding_weight}")
    if not 1.0 <= cfg.high_noise_weight <= 1000.0:
        raise ValueError(f"--high-noise-weight caps the weight 1 / alpha-bar: in [1, 1000] (1 = off), "
                         f"got {cfg.high_noise_weight}")


class TrainingDiverged(ValueError):
    """The loss or the gradient norm became NaN or infinite; the run stops without saving."""


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: join the group (nccl on CUDA, gloo on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    checked = parse_device(device)  # a clear message for a typo or a missing GPU
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=checked)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world, dev)


def hardware_name(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return f"{world}x {torch.cuda.get_device_name(device)}"
    name = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{world}x {name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads/process)"


def prepare_tokenizer(cfg: TrainConfig, out: Path, d: Dist, checkpoint: dict | None, init_folder: Path | None
                      ) -> PromptTokenizer:
    """Put the run's tokenizer.json in the run folder (rank 0) and load it."""
    path = out / TOKENIZER
    if d.main:
        if checkpoint is not None:
            data = checkpoint["tokenizer_json"].encode()
        elif init_folder is not None:
            meta = read_model_config(init_folder)
            if not meta.get("tokenizer"):
                raise ValueError(f"{init_folder} has no tokenizer.json; --init needs a project model folder")
            data = (init_folder / meta["tokenizer"]).read_bytes()
        elif cfg.tokenizer:
            data = Path(cfg.tokenizer).read_bytes()
        else:
            data = shapes.build_tokenizer(None).backend_tokenizer.to_str().encode()
        atomic_write_bytes(path, data)
    if d.ddp:
        dist.barrier()
    return PromptTokenizer.from_tokenizer_json(path)


def build_model(stage: str, cfg: TrainConfig, tokenizer: PromptTokenizer, checkpoint: dict | None,
                init_model: GlideUNet | None) -> tuple[GlideUNet, str]:
    """The model (fp32, CPU) and its noise schedule name."""
    if checkpoint is not None:  # as nanoGPT: rebuild the config from the checkpoint first
        model = GlideUNet(GlideConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        return model, checkpoint["noise_schedule"]
    if init_model is not None:
        model, schedule = init_model, cfg.noise_schedule or init_model.info.noise_schedule
        # a warm start keeps the --init model's architecture; the changes it takes add zero-initialised parts
        changes = {k: v for k, v in cfg.model.items() if v != getattr(model.config, k, None)}
        fixed = sorted(set(changes) - set(GROWABLE))
        if fixed:
            raise ValueError(f"--model-config {cfg.model} differs from the --init model's config in {fixed}; "
                             f"a warm start keeps its architecture (only {sorted(GROWABLE)} can be added); "
                             "drop --init to train a new shape from scratch")
        if changes:
            model = grow_zero_initialised_parts(model, changes)
        if stage == "finetune-inpaint":
            if cfg.upsampler and not model.config.super_res:
                raise ValueError(f"--upsampler was given but {cfg.init} is not an upsampler (super_res is off)")
            if not model.config.inpaint:
                model = widen_for_inpainting(model)
    else:
        if cfg.preset not in PRESETS:
            raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[cfg.preset], **cfg.model, "n_vocab": tokenizer.vocab_size}
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        try:
            model = GlideUNet(GlideConfig.from_dict(fields))
        except (AssertionError, ValueError) as e:  # e.g. channels that do not split into the heads
            raise ValueError(f"--model-config: preset {cfg.preset!r} with {cfg.model} cannot be built: {e}") from e
        schedule = cfg.noise_schedule or PRESET_SCHEDULES.get(cfg.preset, "squaredcos_cap_v2")
    c = model.config
    if stage == "pretrain" and (c.super_res or c.inpaint):
        raise ValueError("pretrain trains a plain text-to-image model; use the upsampler or finetune-inpaint stage")
    if stage == "upsampler" and (not c.super_res or c.inpaint):
        raise ValueError("the upsampler stage needs a super_res model (preset 'upsampler')")
    if c.n_vocab < tokenizer.vocab_size:
        raise ValueError(f"the model has {c.n_vocab} token embeddings but the tokenizer has {tokenizer.vocab_size} "
                         "tokens; use the tokenizer the model was trained with")
    return model, schedule


def decay_steps(cfg: TrainConfig, opt_start: int) -> int:
    """Length of the lr decay in this optimizer's steps: --lr-decay-steps, or what is left after warm-up
    until --max-steps (an absolute step, so a continued run counts from its --init's step)."""
    if cfg.lr_schedule == "constant":
        return 0
    n = cfg.lr_decay_steps or (cfg.max_steps - opt_start - cfg.warmup if cfg.max_steps else 0)
    if n < 1:
        raise ValueError(f"--lr-schedule {cfg.lr_schedule} needs to know where the decay ends: give "
                         f"--lr-decay-steps N, or --max-steps beyond this run's start (step {opt_start}) "
                         f"plus the {cfg.warmup} warm-up steps")
    return n


def get_lr(cfg: TrainConfig, step: int, n_decay: int) -> float:
    """Linear warm-up over cfg.warmup steps, then constant or decaying to cfg.lr_min over n_decay steps.
    step counts this optimizer's steps (a warm start begins at 0 whatever its global step)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = min(1.0, (step - cfg.warmup) / n_decay)
    left = 0.5 * (1.0 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * left


def trainable_parameters(model: GlideUNet, train_only: str) -> list[torch.nn.Parameter]:
    """The parameters to train (TrainConfig.train_only); the others stop needing gradients."""
    if not train_only:
        return list(model.parameters())
    prefixes = [p.strip() for p in train_only.split(",") if p.strip()]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"--train-only {unmatched} names no parameter of this model; use prefixes of its "
                         "parameter names, such as layout_from_text,layout_proj or transformer.")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(tuple(prefixes)))
        if p.requires_grad:
            trained.append(p)
    return trained


@torch.no_grad()
def update_ema(ema: GlideUNet, model: GlideUNet, step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def to_model_inputs(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Collated uint8 images -> float [-1, 1] on the device; tokens and masks moved."""
    def image(x):
        x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    inputs = {"x0": image(batch["image"]),
              "tokens": batch["tokens"].to(device, non_blocking=True),
              "mask": batch["token_mask"].to(device, non_blocking=True)}
    if "low_res" in batch:
        inputs["low_res"] = image(batch["low_res"])
    if "inpaint_mask" in batch:
        inputs["inpaint_mask"] = batch["inpaint_mask"].to(device, non_blocking=True)
    for key in ("token_objects", "object_masks"):  # grounding (TrainingDataset(grounding=True))
        if key in batch:
            inputs[key] = batch[key].to(device, non_blocking=True)
    return inputs


def draw_timesteps(n: int, num_timesteps: int, generator: torch.Generator, device, sampling: str = "uniform",
                   min_timestep: int = 0):
    """n training timesteps on {min_timestep..T-1}: uniform, or "high" with p(t) proportional to t + 1
    (TrainConfig.timesteps, TrainConfig.min_timestep)."""
    if sampling == "uniform":
        return torch.randint(min_timestep, num_timesteps, (n,), generator=generator, device=device)
    # sqrt(m^2 + (1 - m^2) r), r uniform, has density proportional to u on [m, 1]
    m2 = (min_timestep / num_timesteps) ** 2
    u = (m2 + (1.0 - m2) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)).sqrt()
    return (u * num_timesteps).long().clamp_(min=min_timestep, max=num_timesteps - 1)


LAYOUT_NOISE_GRIDS = (2, 4, 8)  # TrainConfig.layout_noise: coarse enough for where objects sit in a 3x3 layout


def compute_losses(model, inputs: dict, schedule, generator: torch.Generator, amp,
                   offset_noise: float = 0.0, timesteps: str = "uniform", layout_noise: float = 0.0,
                   high_noise_weight: float = 1.0, min_timestep: int = 0, grounding_weight: float = 0.0) -> dict:
    """L_hybrid for one batch; t (draw_timesteps) and the noise come from `generator` (plus offset_noise *
    N(0, 1) per image and channel, and layout_noise * N(0, 1) on coarse grids: TrainConfig). "loss" weights
    "mse" by min(1 / alpha-bar_t, high_noise_weight); "mse" itself stays the plain eps loss, for the log. With
    grounding_weight, "loss" also has that times "ground", the grounding loss of the attention blocks that
    keep their text attention (inputs need token_objects and object_masks: TrainingDataset(grounding=True))."""
    x0 = inputs["x0"]
    t = draw_timesteps(x0.shape[0], schedule.num_timesteps, generator, x0.device, timesteps, min_timestep)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator, device=x0.device)
    for grid in LAYOUT_NOISE_GRIDS if layout_noise else ():
        coarse = torch.randn(*x0.shape[:2], grid, grid, generator=generator, device=x0.device)
        noise = noise + layout_noise * F.interpolate(coarse, x0.shape[-2:], mode="bilinear", align_corners=False)
    extra = {}
    if "low_res" in inputs:
        extra["low_res"] = inputs["low_res"]
    if "inpaint_mask" in inputs:  # GLIDE §4.3: the known region of the clean image + the mask
        extra["inpaint_image"] = x0
        extra["inpaint_mask"] = inputs["inpaint_mask"]

    def model_fn(x_t, timesteps):
        with amp:
            return model(x_t, timesteps, inputs["tokens"], inputs["mask"], **extra)

    losses = training_losses(model_fn, x0, t, schedule, noise=noise, high_noise_weight=high_noise_weight)
    if grounding_weight:
        blocks = [m for m in model.modules() if isinstance(m, AttentionBlock) and m.text_attention is not None]
        losses["ground"] = grounding_loss([b.text_attention for b in blocks], inputs["token_objects"],
                                          inputs["object_masks"].float() / 255)
        losses["loss"] = losses["loss"] + grounding_weight * losses["ground"]
        for b in blocks:
            b.text_attention = None  # so the maps, and the graph behind them, do not outlive the step
    return losses


@torch.no_grad()
def caption_gain(model: GlideUNet, dataset: TrainingDataset, schedule, device, amp, n: int = 64) -> float:
    """How much the model uses its captions: 1 - mse(own captions) / mse(the next item's captions), on
    fixed items, timesteps and noise. Near 0 means the text is ignored (what the first shipped base
    model showed: 0.03-0.05); it grows as text conditioning is learned."""
    inputs = to_model_inputs(default_collate([dataset[i] for i in range(n)]), device)
    others = dict(inputs, tokens=inputs["tokens"].roll(1, 0), mask=inputs["mask"].roll(1, 0))
    mse = [compute_losses(model, batch, schedule, torch.Generator(device).manual_seed(0), amp)["mse"].mean().item()
           for batch in (inputs, others)]
    return 1.0 - mse[0] / mse[1]


def unknown_word_fraction(tokenizer: PromptTokenizer, captions: list[str]) -> float:
    unk = tokenizer.unk_id  # the wrapped tokenizer's own unk_token_id is None when read from tokenizer.json
    ids = [i for caption in captions for i in tokenizer.encode(caption)]
    return sum(i == unk for i in ids) / max(1, len(ids)) if unk is not None else 0.0


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- checkpoints


def save_checkpoint(out: Path, state: dict, shard_mb: float = 0.0) -> Path:
    """torch.save the state, as one file or parts of <= shard_mb MiB, then point the manifest at it.

    Order: new files, then the manifest (atomic), then the old files; a crash at any moment leaves
    a manifest that names complete files."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    base = f"ckpt-{state['step']:08d}.pt"
    if shard_mb and shard_mb > 0:
        size = max(1, int(shard_mb * 2**20))
        parts = [(f"{base}.part{i:03d}", data[o:o + size]) for i, o in enumerate(range(0, len(data), size))]
    else:
        parts = [(base, data)]
    for name, chunk in parts:
        atomic_write_bytes(out / name, chunk)
    manifest = {"format": CHECKPOINT_FORMAT, "step": state["step"], "files": [n for n, _ in parts],
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(out / CHECKPOINT_MANIFEST, manifest)
    keep = set(manifest["files"])
    for old in out.glob("ckpt-*.pt*"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return out / CHECKPOINT_MANIFEST


def load_checkpoint(out) -> dict:
    out = Path(out)
    manifest_path = out / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no checkpoint in {out} ({CHECKPOINT_MANIFEST} missing); run without --resume "
                                "to start, or --init a model folder to warm-start")
    manifest = json.loads(manifest_path.read_text())
    missing = [n for n in manifest["files"] if not (out / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint parts {missing} are missing from {out}; copy all ckpt-* files back")
    data = b"".join((out / n).read_bytes() for n in manifest["files"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"the checkpoint in {out} is corrupt (checksum mismatch); use --init {out / MODEL_DIR} "
                         "to warm-start from the last export instead")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def rng_states() -> dict:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(states["torch_cuda"])


# ---- samples


@torch.no_grad()
def sample_grid(model: GlideUNet, dataset: TrainingDataset, schedule, cfg: TrainConfig, device, amp
                ) -> tuple[Image.Image, list[str]]:
    """A grid from fixed preview items: [reference | (masked) input | sample] rows, cheap DPM++ steps."""
    n = cfg.samples
    items = [dataset[i] for i in range(n)]
    inputs = to_model_inputs(default_collate(items), device)
    x0 = inputs["x0"]
    tokenizer, ctx = dataset.tokenizer, dataset.text_ctx
    c = model.config
    scale = 1.0 if c.super_res else cfg.guidance
    uncond = tokenizer.unconditional(n, ctx).to(device)
    tokens = torch.cat([inputs["tokens"], uncond.tokens])
    mask = torch.cat([inputs["mask"], uncond.mask])
    extra = {}
    if c.super_res:
        extra["low_res"] = inputs["low_res"].repeat(2, 1, 1, 1)
    if c.inpaint:
        extra["inpaint_image"] = x0.repeat(2, 1, 1, 1)
        extra["inpaint_mask"] = inputs["inpaint_mask"].repeat(2, 1, 1, 1)

    def model_fn(x, t):
        rows = x.shape[0]
        with amp:
            return model(x, t, tokens[:rows], mask[:rows], **{k: v[:rows] for k, v in extra.items()})

    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    images = sample(classifier_free_guidance(model_fn, scale), noise, schedule=schedule,
                    timesteps=respace(schedule.num_timesteps, str(cfg.sample_steps)), method="dpm++",
                    generator=generator)
    rows = [x0]
    if c.super_res:
        rows.append(torch.nn.functional.interpolate(inputs["low_res"], size=x0.shape[-2:], mode="nearest"))
    if c.inpaint:
        rows.append(x0 * inputs["inpaint_mask"] + 0.3 * (1 - inputs["inpaint_mask"]))  # holes shown gray
    rows.append(images)
    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (3, rows*S, n*S)
    array = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array), [dataset.caption(i) for i in range(n)]


# ---- progress


class RunLog:
    """JSONL log (rank 0): one record per step, plus events. The studio reads this file."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            # drop what a killed run logged after its last checkpoint: those steps are redone
            kept = []
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
            atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
        self.file = open(path, "a", buffering=1) if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class StopFlag:
    """SIGTERM/SIGINT (main thread only) and an optional threading.Event both ask the loop to stop."""

    def __init__(self, stop_event: threading.Event | None, announce: bool):
        self.reason: str | None = None
        self.stop_event = stop_event
        self.announce = announce
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.reason == "signal" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without saving
        self.reason = "signal"
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again aborts)",
                  file=sys.stderr, flush=True)

    def check(self) -> str | None:
        if self.reason is None and self.stop_event is not None and self.stop_event.is_set():
            self.reason = "stop_event"
        return self.reason

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# The loop


def clear_previous_run(out: Path) -> None:
    """--overwrite: remove the old run's files (and only those), the manifest first, so a kill
    before the new run's first checkpoint cannot --resume the old one or mix the two logs."""
    (out / CHECKPOINT_MANIFEST).unlink(missing_ok=True)
    for path in [*out.glob("ckpt-*.pt*"), out / LOG, *(out / "samples").glob("step-*.*")]:
        path.unlink(missing_ok=True)
    if (out / MODEL_DIR / "config.json").is_file():
        shutil.rmtree(out / MODEL_DIR)


def run(stage: str, progress_callback: Callable[[dict], None] | None = None,
        stop_event: threading.Event | None = None, **options) -> RunResult:
    """Train one stage; returns when it stops (max steps/minutes, signal, stop_event), saved and exported.

    options: TrainConfig fields (see `python -m pipelines.training <stage> --help`).
    progress_callback(record): called on rank 0 with every flushed step record and every event.
    stop_event: a threading.Event; setting it stops after the current step, saving everything.
    """
    t_start = time.time()
    cfg, checkpoint = resolve_config(stage, options)
    d = setup_distributed(cfg.device)
    device = d.device
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None and (out / CHECKPOINT_MANIFEST).exists() and not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint; pass --resume to continue it, "
                                  "--overwrite to start over, or choose another --out")
        if checkpoint is None and cfg.overwrite:
            clear_previous_run(out)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())

    # model, tokenizer, schedule
    init_folder = Path(cfg.init) if cfg.init and checkpoint is None else None
    init_model, init_record = None, {}
    if init_folder is not None:
        init_model = load_model(init_folder, device="cpu", dtype=torch.float32)
        init_record = init_model.info.training or {}
    tokenizer = prepare_tokenizer(cfg, out, d, checkpoint, init_folder)
    raw_model, schedule_name = build_model(stage, cfg, tokenizer, checkpoint, init_model)
    # the layout is the run's choice, whatever load_model gave an --init model (channels_last on the CPU)
    raw_model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format).train()
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False)
    schedule = make_schedule(schedule_name)
    if not 0 <= cfg.min_timestep < schedule.num_timesteps:
        raise ValueError(f"--min-timestep must be in [0, {schedule.num_timesteps - 1}] for the "
                         f"{schedule.num_timesteps}-step schedule, got {cfg.min_timestep}")
    c = raw_model.config

    # data
    source = make_source(cfg.data, c.image_size, cfg.captions, cfg.min_image_size or None)
    low_res = c.image_size // UPSAMPLE_FACTOR if c.super_res else None
    masks = parse_weights(cfg.masks) if stage == "finetune-inpaint" else None
    grounding = cfg.grounding_weight > 0
    dataset = TrainingDataset(source, tokenizer, c.text_ctx, cfg.seed, cfg.caption_drop, low_res, masks, grounding)
    for block in raw_model.modules():
        if isinstance(block, AttentionBlock):
            block.keep_text_attention = grounding
    preview = TrainingDataset(source, tokenizer, c.text_ctx, cfg.seed + 7919, 0.0, low_res, masks)
    data_descriptor = source.describe()

    # counters: fresh, resumed, or continued from an --init export of the same run
    step, data_position, images_seen, wall_before, loss_ema, opt_start = 0, 0, 0, 0.0, None, 0
    continues = (init_record.get("stage") == stage and init_record.get("data") == data_descriptor
                 and init_record.get("seed") == cfg.seed and "data_position" in init_record)
    if continues:
        step = opt_start = int(init_record["steps"])
        data_position, images_seen = int(init_record["data_position"]), int(init_record["images_seen"])
        wall_before, loss_ema = float(init_record.get("wall_time_s", 0.0)), init_record.get("final_loss")
    trained = trainable_parameters(raw_model, cfg.train_only)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, fused=fused)
    if checkpoint is not None:
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, data_position = checkpoint["step"], checkpoint["data_position"]
        images_seen, wall_before = checkpoint["images_seen"], checkpoint["wall_time_s"]
        loss_ema, opt_start = checkpoint["loss_ema"], checkpoint["optimizer_start_step"]
        init_record = checkpoint["init_record"]
        restore_rng_states(checkpoint["rng"])
    n_decay = decay_steps(cfg, opt_start)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    workers = cfg.workers if cfg.workers >= 0 else (min(12, max(0, (os.cpu_count() or 1) - 2))
                                                    if device.type == "cuda" else 0)
    loader = make_loader(dataset, data_position, cfg.batch_size, d.rank, d.world_size, workers,
                         pin_memory=device.type == "cuda")
    global_batch = cfg.batch_size * d.world_size
    hardware = hardware_name(device, d.world_size)
    name = cfg.name or {"pretrain": "base", "upsampler": "upsampler"}.get(
        stage, "upsampler-inpaint" if c.super_res else "base-inpaint")

    log = RunLog(out / LOG, d.main, checkpoint["step"] if checkpoint is not None else None)

    def emit(record: dict) -> None:
        log.write(record)
        if progress_callback is not None and d.main:
            progress_callback(record)

    def say(text: str) -> None:
        if d.main and not cfg.quiet:
            print(text, flush=True)

    if d.main:
        atomic_write_json(out / "run.json", {"stage": stage, **cfg.to_dict(), "world_size": d.world_size})
        if isinstance(source, FolderSource):
            atomic_write_json(out / "data_report.json", {
                "data": data_descriptor, "used": len(source),
                "skipped": [{"path": p, "reason": r} for p, r in source.skipped]})
            say(source.report())
            unknown = unknown_word_fraction(tokenizer, [caps[0] for _, caps in source.items[:500]])
            if unknown > 0.05:
                say(f"warning: {unknown:.0%} of the caption words are not in the tokenizer's vocabulary "
                    "(they all read as [UNK]); the shapes tokenizer knows only the shapes world's words")
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"{stage}: {name} {n_params / 1e6:.2f}M params, {c.image_size}px, {precision} on {hardware}; "
        f"data {data_descriptor}; global batch {global_batch}; "
        + (f"resumed at step {step}" if checkpoint is not None else
           f"continuing {cfg.init} at step {step}" if continues else f"from {cfg.init or 'scratch'}"))
    emit({"event": "start", "stage": stage, "step": step, "params": n_params, "hardware": hardware,
          "world_size": d.world_size, "global_batch": global_batch, "data": data_descriptor,
          "resumed": checkpoint is not None, "skipped": [list(s) for s in source.skipped]})

    def training_record() -> dict:
        return {"stage": stage, "data": data_descriptor, "seed": cfg.seed, "steps": step,
                "images_seen": images_seen, "data_position": data_position,
                "wall_time_s": round(wall_before + time.time() - t_start, 1), "hardware": hardware,
                "final_loss": loss_ema, "batch_size": global_batch, "lr": cfg.lr, "warmup": cfg.warmup,
                "lr_schedule": cfg.lr_schedule, "lr_min": cfg.lr_min, "lr_decay_steps": n_decay,
                "ema_decay": cfg.ema_decay, "caption_drop": cfg.caption_drop, "captions": cfg.captions,
                "offset_noise": cfg.offset_noise, "layout_noise": cfg.layout_noise, "timesteps": cfg.timesteps,
                "min_timestep": cfg.min_timestep, "train_only": cfg.train_only,
                "high_noise_weight": cfg.high_noise_weight, "grounding_weight": cfg.grounding_weight,
                "precision": precision, "preset": None if (cfg.init or checkpoint) else cfg.preset,
                # the warm start's whole record nests here, so a chain of runs keeps every leg's hardware and time
                "init": ({"path": str(cfg.init), **{k: init_record.get(k) for k in ("stage", "data", "steps")},
                          "training": init_record or None} if cfg.init else None)}

    def save_all() -> None:
        """Checkpoint + export (rank 0)."""
        if not d.main:
            return
        state = {"format": CHECKPOINT_FORMAT, "stage": stage, "step": step, "data_position": data_position,
                 "images_seen": images_seen, "wall_time_s": wall_before + time.time() - t_start,
                 "loss_ema": loss_ema, "optimizer_start_step": opt_start,
                 "model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_states(), "run_config": cfg.to_dict(), "model_config": c.to_dict(),
                 "noise_schedule": schedule_name, "tokenizer_json": (out / TOKENIZER).read_text(),
                 "init_record": json.loads(json.dumps(init_record))}  # plain types for weights_only
        save_checkpoint(out, state, cfg.checkpoint_shard_mb)
        emit({"event": "checkpoint", "step": step})
        export()

    def export() -> None:
        if d.main:
            save_model(ema, out / MODEL_DIR, noise_schedule=schedule_name, tokenizer_file=out / TOKENIZER,
                       training=training_record(), name=name)
            emit({"event": "export", "step": step, "path": str(out / MODEL_DIR)})

    def write_samples() -> None:
        if d.main and cfg.samples > 0:
            grid, captions = sample_grid(ema, preview, schedule, cfg, device, amp)
            atomic_save_png(out / "samples" / f"step-{step:08d}.png", grid)
            atomic_write_bytes(out / "samples" / f"step-{step:08d}.txt", ("\n".join(captions) + "\n").encode())
            gain = caption_gain(ema, preview, schedule, device, amp, n=min(64, max(2, 4 * cfg.samples)))
            say(f"step {step} | caption gain {gain:.3f} (1 - mse with own captions / mse with another item's)")
            emit({"event": "samples", "step": step, "path": str(out / "samples" / f"step-{step:08d}.png"),
                  "caption_gain": gain})

    stop = StopFlag(stop_event, announce=d.main and not cfg.quiet)
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, [loss, mse, vb, grad_norm]) not yet logged
    interval_start, interval_images, paused = time.time(), 0, 0.0
    images_per_s, reason, last_saved, first_step = 0.0, None, step, step

    def flush(progress_line: bool) -> None:
        """Log the pending steps (one host sync per interval, not per step) and print the progress line."""
        nonlocal loss_ema, images_per_s, interval_start, interval_images, paused
        if not pending:
            return
        values = torch.stack([v for _, _, v in pending])
        if d.ddp:
            dist.all_reduce(values)
            values /= d.world_size
        now = time.time()
        if interval_images:
            images_per_s = interval_images / max(1e-9, now - interval_start - paused)
        elapsed = now - t_start
        eta = (cfg.max_steps - step) * global_batch / max(images_per_s, 1e-9) if cfg.max_steps else None
        if cfg.max_minutes:
            eta = min(math.inf if eta is None else eta, max(0.0, 60 * cfg.max_minutes - elapsed))
        diverged = None
        for (s, lr_s, _), (l, m, v, g, gr) in zip(pending, values.tolist()):
            loss_ema = l if loss_ema is None else 0.98 * loss_ema + 0.02 * l
            emit({"step": s, "loss": l, "mse": m, "vb": v, "grad_norm": g, "lr": lr_s,
                  **({"ground": gr} if grounding else {}),
                  "images_seen": images_seen - (step - s) * global_batch, "images_per_s": round(images_per_s, 2),
                  "elapsed_s": round(elapsed, 2), "eta_s": None if eta is None else round(eta, 1)})
            if diverged is None and not (math.isfinite(l) and math.isfinite(g)):
                diverged = (s, l, g)
        pending.clear()
        if diverged is not None:  # the weights are poisoned: never save them over a good checkpoint
            raise TrainingDiverged(
                f"training diverged at step {diverged[0]} (loss {diverged[1]}, gradient norm {diverged[2]}); "
                f"nothing after step {last_saved} was saved, so the checkpoint in {out} is intact: --resume "
                f"it with a lower --lr (now {cfg.lr:g})")
        if progress_line:
            total = f"/{cfg.max_steps}" if cfg.max_steps else ""
            say(f"step {step}{total} | loss {loss_ema:.4f} (last: mse {m:.4f} vb {v:.4f}) | "
                f"{images_per_s:.1f} img/s | lr {lr_s:.2e} | {format_duration(elapsed)} elapsed, "
                f"ETA {format_duration(eta)}")
        interval_start, interval_images, paused = time.time(), 0, 0.0

    try:
        batches = iter(loader)
        while True:
            # stop? (max steps is the same on every rank; time and signals are agreed at log points)
            if cfg.max_steps and step >= cfg.max_steps:
                reason = "max_steps"
            elif not d.ddp or (step - first_step) % cfg.log_every == 0:
                reasons = ("signal", "stop_event", "max_minutes")
                local = stop.check() or (
                    "max_minutes" if cfg.max_minutes and time.time() - t_start >= 60 * cfg.max_minutes else None)
                if d.ddp:
                    flag = torch.tensor([0 if local is None else 1 + reasons.index(local)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    local = None if flag.item() == 0 else reasons[int(flag.item()) - 1]
                reason = local
            if reason:
                break

            # one step
            lr = get_lr(cfg, step - opt_start, n_decay)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = to_model_inputs(next(batches), device, cfg.channels_last)
            # why: dropout draws from the global RNG (it takes no generator), so seed it per step;
            # t and noise come from their own generator. Both are pure functions of (seed, step, rank).
            torch.manual_seed(derived_seed(cfg.seed, 1, step, d.rank))
            generator = torch.Generator(device).manual_seed(derived_seed(cfg.seed, 2, step, d.rank))
            losses = compute_losses(model, inputs, schedule, generator, amp, cfg.offset_noise, cfg.timesteps,
                                    cfg.layout_noise, cfg.high_noise_weight, cfg.min_timestep, cfg.grounding_weight)
            loss = losses["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            update_ema(ema, raw_model, step - opt_start, cfg.ema_decay)
            step += 1
            data_position += global_batch
            images_seen += global_batch
            interval_images += global_batch
            ground = torch.zeros((), device=device)
            if grounding:  # logged over the examples whose caption names an object (not the dropped ones)
                named = (inputs["token_objects"] >= 0).any(1)
                ground = losses["ground"].detach().sum() / named.sum().clamp(min=1)
            pending.append((step, lr, torch.stack([loss.detach(), losses["mse"].detach().mean(),
                                                   losses["vb"].detach().mean(), grad_norm.detach().float(),
                                                   ground])))

            if step % cfg.log_every == 0:
                flush(progress_line=True)
            t_extra = time.time()
            if step % cfg.checkpoint_every == 0:  # at least 1 (check_numbers)
                flush(progress_line=False)  # the checkpoint's loss EMA must include every step
                save_all()
                last_saved = step
            elif cfg.export_every and step % cfg.export_every == 0:
                export()
            if cfg.sample_every and step % cfg.sample_every == 0:
                write_samples()
            paused += time.time() - t_extra
    finally:
        stop.restore()
        if reason is None:  # an exception: keep the log readable (no save: the step may be half done)
            log.close()

    # the end (also after a signal): flush the log, checkpoint + export, a last sample grid
    flush(progress_line=True)
    if step != last_saved or not (out / CHECKPOINT_MANIFEST).exists():
        save_all()
    else:
        export()  # fresh training record; the weights are those of the checkpoint
    if cfg.sample_every and step % cfg.sample_every != 0 and step > first_step:
        write_samples()
    hashes = None
    if d.ddp:  # every rank must end with the same weights: compare them
        hashes = [None] * d.world_size
        dist.all_gather_object(hashes, state_hash(raw_model))
    wall = wall_before + time.time() - t_start
    emit({"event": "end", "step": step, "reason": reason, "images_seen": images_seen,
          "final_loss": loss_ema, "wall_time_s": round(wall, 1), "rank_weight_hashes": hashes})
    if reason == "signal":
        say(f"stopped by user; saved at step {step} ({out / MODEL_DIR})")
    else:
        say(f"done ({reason}) at step {step}; model in {out / MODEL_DIR}")
    log.close()
    del batches, loader
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(out=str(out), model_dir=str(out / MODEL_DIR), checkpoint=str(out / CHECKPOINT_MANIFEST),
                     stage=stage, step=step, images_seen=images_seen, final_loss=loss_ema, stop_reason=reason,
                     wall_time_s=wall, images_per_s=images_per_s, skipped=list(source.skipped))
