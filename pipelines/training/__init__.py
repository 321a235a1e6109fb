"""Training: pre-train a text-conditional model, fine-tune it for inpainting, train the upsampler.

    python -m pipelines.training pretrain|finetune-inpaint|upsampler --help

Python API (the CLI calls the same function):

    from pipelines.training import run
    result = run("pretrain", out="runs/base", max_minutes=5, progress_callback=print, stop_event=event)

`run` blocks until the run stops and returns a RunResult (the exported model folder is
`result.model_dir`). It is safest in a subprocess (`python -m pipelines.training ...`): the run then
has its own signal handling, DataLoader workers and torch threads, and the caller follows
`<out>/log.jsonl`, one JSON record per step plus events (start, checkpoint, export, samples, end).
In a thread it also works: signal handlers are not installed (use `stop_event`), but keep
`workers=0` (forking a process with many threads is unsafe) and expect it to reseed torch's
global RNG every step (dropout has no generator argument).

After training the base further, `pipelines.training.graft.graft_update` (CLI: `python -m
pipelines.training.graft`) adds its weight change to the inpainting model fine-tuned from it,
instead of widening and fine-tuning again. (Not imported here, so that `-m` runs it cleanly.)
"""

from .data import DataError, FolderSource, ShapesSource, TrainingDataset
from .masks import random_mask
from .train import PRESETS, STAGES, RunResult, TrainConfig, load_checkpoint, run
from .widen import widen_for_inpainting

__all__ = ["DataError", "FolderSource", "PRESETS", "RunResult", "STAGES", "ShapesSource", "TrainConfig",
           "TrainingDataset", "load_checkpoint", "random_mask", "run", "widen_for_inpainting"]
