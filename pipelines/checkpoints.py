"""Loading and saving models: the released GLIDE `.pt` files and the project's own safetensors folders.

A project model is a folder:
    config.json        {"architecture": "glide", "config": {GlideConfig fields},
                        "noise_schedule": ..., "tokenizer": "tokenizer.json", "training": {...}}
    model.safetensors  weights (fp16 storage is fine; they are cast on load)
    tokenizer.json     the prompt tokenizer (shapes models)
A released GLIDE file is a plain state dict; its variant is inferred from its keys and shapes,
and its tokenizer files (encoder.json, vocab.bpe) are looked up beside it.
Everything loads with `weights_only=True` or safetensors: no pickled code runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import atomic_replace_dir, restore_interrupted_dir
from .models.glide import GlideConfig, GlideUNet
from .tokenizer import GPT2_FILES, PromptTokenizer, find_gpt2_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# in-channels of the first conv -> released variant
RELEASED_VARIANTS = {3: "base", 6: "upsample", 7: "base-inpaint", 10: "upsample-inpaint"}
RELEASED_SCHEDULES = {"base": "squaredcos_cap_v2", "base-inpaint": "squaredcos_cap_v2",
                      "upsample": "linear", "upsample-inpaint": "linear"}


class CheckpointError(ValueError):
    """A model file could not be loaded; the message names the problem and what to do."""


@dataclass
class ModelInfo:
    name: str  # e.g. "base", "base-inpaint", or the folder name
    source: str  # path it was loaded from
    noise_schedule: str
    tokenizer: PromptTokenizer | None
    training: dict = field(default_factory=dict)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device) -> torch.device:
    """A device name as the user gave it → torch.device, or a ValueError saying what this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine (or this torch build) has no CUDA GPU; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA GPUs")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision on CUDA (the fast path); fp32 on CPU, where half is slow.
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def use_fast_layout(model: GlideUNet) -> GlideUNet:
    """Lay a model's weights out for inference on its device, in place: channels_last on the CPU, where
    oneDNN's convolutions then skip a layout conversion per call (measured on a 2-core CPU, 1.14x per
    base forward at batch 2 and 1.48x per upsampler forward at 256 px; `python -m pipelines.bench.speed`).
    CUDA keeps the default layout (unmeasured there)."""
    if model.device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def load_model(path, device=None, dtype=None) -> GlideUNet:
    """Load a model file or folder; returns the module with `.config` and `.info` (ModelInfo)."""
    path = Path(path)
    restore_interrupted_dir(path)  # an export that a killed trainer left half swapped
    if not path.exists():
        raise CheckpointError(f"no model at {path}; give a model folder (config.json + model.safetensors) "
                              "or a released GLIDE .pt file")
    if path.is_dir() or path.suffix == ".safetensors":
        model, info = _load_project_model(path)
    else:
        model, info = _load_released(path)
    device = torch.device(device) if device is not None else default_device()
    model = use_fast_layout(model.to(device=device, dtype=dtype or default_dtype(device)).eval())
    model.info = info
    return model


def read_model_config(folder: Path) -> dict:
    """The parsed config.json of a project model folder; CheckpointError naming the file if it cannot be read
    or is not a JSON object."""
    config_path = Path(folder) / CONFIG_FILE
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{config_path} is not a valid model config: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path} is not a valid model config: expected a JSON object")
    return meta


def _load_project_model(path: Path):
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_FILE if path.is_dir() else path
    config_path = folder / CONFIG_FILE
    for needed in (config_path, weights):
        if not needed.is_file():
            raise CheckpointError(f"{needed.name} is missing from {folder}; a model folder holds "
                                  f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = read_model_config(folder)
    # the architecture is checked first: another architecture's config has other fields
    if meta.get("architecture", "glide") != "glide":
        raise CheckpointError(f"{folder} holds a {meta['architecture']!r} model; this loader reads GLIDE models")
    try:
        config = GlideConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a valid model config: {type(e).__name__}: {e}") from e
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        model = GlideUNet(config)
    except AssertionError as e:  # fields that are each valid but do not fit together (heads, channels)
        raise CheckpointError(f"{config_path} describes a model that cannot be built: {e}") from e
    _load_state(model, state, weights)
    tokenizer = None
    if meta.get("tokenizer"):
        tokenizer = _load_tokenizer(PromptTokenizer.from_tokenizer_json, folder / meta["tokenizer"])
    info = ModelInfo(name=meta.get("name", folder.name), source=str(folder),
                     noise_schedule=meta.get("noise_schedule", "squaredcos_cap_v2"),
                     tokenizer=tokenizer, training=meta.get("training", {}))
    return model, info


def _load_released(path: Path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt, or another "
                              f"format): {type(e).__name__}: {str(e)[:200]}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; expected a released GLIDE file")
    first = state.get("input_blocks.0.0.weight")
    if first is None or first.ndim != 4 or first.shape[1] not in RELEASED_VARIANTS:
        raise CheckpointError(f"{path} is not a GLIDE U-Net checkpoint (no recognisable input_blocks.0.0.weight); "
                              "expected base.pt, upsample.pt, base_inpaint.pt or upsample_inpaint.pt")
    variant = RELEASED_VARIANTS[first.shape[1]]
    with torch.device("meta"):  # 385M parameters: build without allocating, then receive the file's tensors
        model = GlideUNet(GlideConfig.preset(variant))
    # assign=True: the parameters become the file's tensors (no second 1.5 GB copy; nothing allocated if it fails)
    _load_state(model, state, path, assign=True)
    tokenizer = None
    if all(find_gpt2_file(path.parent, name) for name in GPT2_FILES):
        tokenizer = _load_tokenizer(PromptTokenizer.from_gpt2_files, path.parent)
    info = ModelInfo(name=variant, source=str(path), noise_schedule=RELEASED_SCHEDULES[variant], tokenizer=tokenizer)
    return model, info


def _load_tokenizer(loader, path: Path) -> PromptTokenizer:
    try:
        return loader(path)
    except Exception as e:  # FileNotFoundError, ValueError, and `tokenizers`' plain Exception for a corrupt file
        raise CheckpointError(f"the model's tokenizer at {path} could not be loaded "
                              f"({type(e).__name__}: {str(e)[:200]}); restore the tokenizer file(s)") from e


def _load_state(model: torch.nn.Module, state: dict, path, assign: bool = False) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} keys with other shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {expected[k]})")
        raise CheckpointError(f"{path} does not match the model it claims to be: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=assign)


def save_model(model: GlideUNet, folder, *, noise_schedule: str, tokenizer_file=None, training=None,
               name=None, dtype=torch.float16) -> None:
    """Write a model folder atomically (weights in `dtype`, config, tokenizer, training record)."""
    folder = Path(folder)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    meta = {"architecture": "glide", "name": name or folder.name, "config": model.config.to_dict(),
            "noise_schedule": noise_schedule, "tokenizer": TOKENIZER_FILE if tokenizer_file else None,
            "training": training or {}}

    def build(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer_file:
            (tmp / TOKENIZER_FILE).write_bytes(Path(tokenizer_file).read_bytes())
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    atomic_replace_dir(build, folder)
