"""Text-guided inpainting, two ways (GLIDE §4.3 and Appendix E).

mode="finetuned": the inpainting model (base-inpaint: 4 extra input channels, the masked image and
  the mask) sees the known pixels at every step; they are also forced into every x_0 prediction.
mode="replace": any model; after each step the known region of x_t is replaced by a fresh sample
  of q(x_t | x_0) (the technique GLIDE compares against), and forced into x_0 as well. With an
  inpainting model this is GLIDE App. E's "context fully masked out".

Any image size: a square around the mask (+ padding) is cropped, resized to the model's
resolution, generated, resized back and composited onto the original ONLY inside the mask
(feathered over `mask_blur` px inside its edge). Pixels where the mask is black come back
bit-exactly (compared in RGB: the output is RGB; RGBA is composited on white, L/P/16-bit are
converted, as `io.load_image` does) and `changed_outside_mask` counts any that did not.
"""

from __future__ import annotations

import time

import torch

from .base import MaskedEditPipeline, PipelineInputError, check_prompt, reproducible, resolve_seed, to_rgb_array
from .checkpoints import CheckpointError
from .defaults import (DEFAULT_GUIDANCE_INPAINT, DEFAULT_GUIDANCE_MIN_T, DEFAULT_GUIDANCE_MIN_T_INPAINT,
                       DEFAULT_MASK_BLUR, DEFAULT_PADDING, DEFAULT_SAMPLER, DEFAULT_STEPS_INPAINT,
                       DEFAULT_UPSAMPLE_SAMPLER_INPAINT, DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH,
                       DEFAULT_UPSAMPLE_TEMPERATURE)

MODES = ("finetuned", "replace")


class InpaintPipeline(MaskedEditPipeline):
    name = "inpaint"

    def check_inputs(self, prompt, negative_prompt, mode, strength, mask_blur, padding, num_images,
                     num_inference_steps, sampler, guidance_scale, guidance_min_t, upsample, upsample_steps,
                     upsample_sampler, upsample_temperature, upsample_strength):
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative_prompt")
        if mode not in MODES:
            raise PipelineInputError(f"mode must be 'finetuned' (inpainting model) or 'replace' (any model); got {mode!r}")
        self._check_edit_args(strength, mask_blur, padding, num_images, num_inference_steps, sampler, guidance_scale,
                              guidance_min_t, upsample, upsample_steps, upsample_sampler, upsample_temperature,
                              upsample_strength)

    @reproducible
    @torch.inference_mode()
    def __call__(self, prompt: str, image, mask_image, *, negative_prompt: str = "", mode: str = "finetuned",
                 strength: float = 1.0, mask_blur: float = DEFAULT_MASK_BLUR, padding: int = DEFAULT_PADDING,
                 num_images: int = 1,
                 num_inference_steps: int | str = DEFAULT_STEPS_INPAINT, sampler: str = DEFAULT_SAMPLER,
                 guidance_scale: float = DEFAULT_GUIDANCE_INPAINT, guidance_min_t: int | None = None,
                 generator=None, seed: int | None = None,
                 upsample: bool | None = None, upsample_steps: int | str = DEFAULT_UPSAMPLE_STEPS,
                 upsample_sampler: str = DEFAULT_UPSAMPLE_SAMPLER_INPAINT,
                 upsample_temperature: float = DEFAULT_UPSAMPLE_TEMPERATURE,
                 upsample_strength: float = DEFAULT_UPSAMPLE_STRENGTH, callback_on_step_end=None,
                 pipeline: str | None = None, models: dict | None = None, device=None, dtype=None):
        """Regenerate the white part of `mask_image` in `image` following `prompt`.

        Defaults (pipelines/defaults.py): 25 steps of ancestral "ddpm", guidance 5.0; the upsampler
        stage samples ancestrally too, from min(strength, upsample_strength), starting from
        the known pixels and, inside the mask, the enlarged base result.
        guidance_min_t: guidance only at timesteps t >= this; None = 700 with mode="finetuned" from
          strength 1 (the model sees the known pixels, so later guidance only harms the seam), else 300
          (with "replace"; and from strength < 1, whose run may start below t = 700).
        strength: 1 = the masked region starts from pure noise; < 1 starts from q(x_t | image)
          at step round(strength * steps) (diffusers-like); 0 returns the image unchanged.
        mask_blur: width in px (full resolution) of the blend band inside the mask edge.
        padding: px of context around the mask's bounding box in the square working crop.
        upsample: None = automatic: with mode="finetuned", through the 10-channel upsampler-inpaint
          model when there is one and the crop is at least its output size (else base resolution);
          True forces an upsampler stage (finetuned prefers the 10-channel model, replace the plain
          upsampler; without extra channels the known region is replaced each step);
          False = base resolution only. params["upsample"] records what ran.
        pipeline/models/device/dtype/num_threads: accepted so that `**result.params` replays the
          call (num_threads sets the CPU thread count for the call; see base.reproducible).
        """
        t_start = time.perf_counter()
        timings: dict = {}
        # 1. Check inputs
        self._start(num_images, guidance_scale, sampler, pipeline)
        if guidance_min_t is None:
            from_noise_finetuned = mode == "finetuned" and strength == 1
            guidance_min_t = DEFAULT_GUIDANCE_MIN_T_INPAINT if from_noise_finetuned else DEFAULT_GUIDANCE_MIN_T
        self.check_inputs(prompt, negative_prompt, mode, strength, mask_blur, padding, num_images,
                          num_inference_steps, sampler, guidance_scale, guidance_min_t, upsample, upsample_steps,
                          upsample_sampler, upsample_temperature, upsample_strength)
        seed, warnings = resolve_seed(seed, generator)
        # 2. Read the image and the mask (white = regenerate)
        image_arr = to_rgb_array(image)
        if mask_image is None:
            raise PipelineInputError("mask_image is required (white = regenerate); use Text2ImagePipeline "
                                     "or SDEditPipeline without a mask")
        crop = self._crop_around_mask(image_arr, mask_image, padding=padding, mask_blur=mask_blur, warnings=warnings,
                                      if_empty="the mask is empty (no pixel is white; transparent ones count as "
                                               "black): there is nothing to regenerate; paint the area to "
                                               "change in white")
        # 3. Pick the models
        if mode == "finetuned":
            if not self.store.has("base-inpaint"):
                raise CheckpointError(f"mode='finetuned' needs an inpainting model (base-inpaint) and there is "
                                      f"none in {self.store.path}; use mode='replace', which works with any model")
            base_role, base_channels = "base-inpaint", True
            # automatic upsampling only through the 10-channel inpainting upsampler, as GLIDE's notebook
            up_roles = ("upsampler-inpaint",) if upsample is None else ("upsampler-inpaint", "upsampler")
        else:
            base_role, base_channels = self.store.require("base", "base-inpaint"), False
            up_roles = () if upsample is None else ("upsampler", "upsampler-inpaint")
        up_role = self._resolve_upsample(upsample, crop.side, up_roles)
        up_channels = up_role == "upsampler-inpaint" and mode == "finetuned"
        roles = {"base": base_role, **({"upsampler": up_role} if up_role else {})}
        params = self._header(seed, {k: self.store.model_id(r) for k, r in roles.items()})
        params.update(prompt=prompt, negative_prompt=negative_prompt, mode=mode, strength=float(strength),
                      mask_blur=mask_blur, padding=int(padding), num_images=int(num_images),
                      num_inference_steps=num_inference_steps, sampler=sampler, guidance_scale=float(guidance_scale),
                      guidance_min_t=int(guidance_min_t), upsample=up_role is not None, upsample_steps=upsample_steps,
                      upsample_sampler=upsample_sampler, upsample_temperature=float(upsample_temperature),
                      upsample_strength=float(upsample_strength))
        # 4. Denoise the crop and paste it back inside the mask
        return self._masked_edit(image=image_arr, crop=crop, masked=True, warnings=warnings, params=params,
                                 recorded=(models, device, dtype), base_role=base_role, base_channels=base_channels,
                                 up_role=up_role, up_channels=up_channels, callback_on_step_end=callback_on_step_end,
                                 timings=timings, t_start=t_start)
