"""Text-guided diffusion pipelines (GLIDE family): models, diffusion, pipeline objects, training."""

from .base import (EmptyMaskError, GenerationInterrupted, ModelStore, NonFiniteOutputError, PipelineInputError,
                   PipelineOutput)
from .checkpoints import CheckpointError, load_model, save_model
from .inpaint import InpaintPipeline
from .scene import Scene, SceneError
from .sdedit import SDEditPipeline
from .text2image import Text2ImagePipeline
from .upsample import UpsamplePipeline

__all__ = ["CheckpointError", "EmptyMaskError", "GenerationInterrupted", "InpaintPipeline", "ModelStore",
           "NonFiniteOutputError", "PipelineInputError", "PipelineOutput", "SDEditPipeline", "Scene", "SceneError",
           "Text2ImagePipeline", "UpsamplePipeline", "load_model", "save_model"]
