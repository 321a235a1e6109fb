"""Text-guided diffusion pipelines (GLIDE family): models, diffusion, pipeline objects, training.

The public names below are imported on first use (PEP 562), so that `import pipelines.defaults`
and `import pipelines.io` do not bring torch: the studio reads its defaults before torch is loaded.
`from pipelines import InpaintPipeline` and `pipelines.Scene` work as before.
"""

from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "EmptyMaskError": "base", "GenerationInterrupted": "base", "ModelStore": "base", "NonFiniteOutputError": "base",
    "PipelineInputError": "base", "PipelineOutput": "base",
    "CheckpointError": "checkpoints", "load_model": "checkpoints", "save_model": "checkpoints",
    "InpaintPipeline": "inpaint", "Scene": "scene", "SceneError": "scene", "SDEditPipeline": "sdedit",
    "Text2ImagePipeline": "text2image", "UpsamplePipeline": "upsample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule used as an attribute (pipelines.base, pipelines.io, ...)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
