"""Text-conditional SDEdit (Meng et al. 2021; GLIDE Figure 4): edit by sketching.

The image (a photo with coloured strokes painted over it, or a blank canvas with strokes) is
noised to the timestep set by `strength` and denoised with classifier-free guidance towards the
prompt: the strokes' colours and layout survive, their look follows the text. strength 0 returns
the image unchanged (no model call); strength 1 starts from pure noise and ignores it.

With `mask_image` only the masked region changes: the known region is replaced by q(x_t | x_0)
after every step and forced into x_0 (as in replacement inpainting), and the result is pasted back
inside the mask only, with the same exact-preservation rule and crop as InpaintPipeline.
Without a mask the whole image is edited (square working crop around it; output has its size).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .base import MaskedCrop, MaskedEditPipeline, check_prompt, reproducible, resolve_seed, to_rgb_array
from .defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_MIN_T, DEFAULT_MASK_BLUR, DEFAULT_PADDING, DEFAULT_SAMPLER,
                       DEFAULT_SDEDIT_STRENGTH, DEFAULT_STEPS, DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_STEPS,
                       DEFAULT_UPSAMPLE_STRENGTH, DEFAULT_UPSAMPLE_TEMPERATURE)


class SDEditPipeline(MaskedEditPipeline):
    name = "sdedit"

    def check_inputs(self, prompt, negative_prompt, strength, mask_blur, padding, num_images, num_inference_steps,
                     sampler, guidance_scale, guidance_min_t, upsample, upsample_steps, upsample_sampler,
                     upsample_temperature, upsample_strength):
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative_prompt")
        self._check_edit_args(strength, mask_blur, padding, num_images, num_inference_steps, sampler, guidance_scale,
                              guidance_min_t, upsample, upsample_steps, upsample_sampler, upsample_temperature,
                              upsample_strength)

    @reproducible
    @torch.inference_mode()
    def __call__(self, prompt: str, image, strength: float = DEFAULT_SDEDIT_STRENGTH, mask_image=None, *,
                 negative_prompt: str = "", mask_blur: float = DEFAULT_MASK_BLUR, padding: int = DEFAULT_PADDING,
                 num_images: int = 1,
                 num_inference_steps: int | str = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                 guidance_scale: float = DEFAULT_GUIDANCE, guidance_min_t: int = DEFAULT_GUIDANCE_MIN_T,
                 generator=None, seed: int | None = None,
                 upsample: bool | None = None, upsample_steps: int | str = DEFAULT_UPSAMPLE_STEPS,
                 upsample_sampler: str = DEFAULT_UPSAMPLE_SAMPLER,
                 upsample_temperature: float = DEFAULT_UPSAMPLE_TEMPERATURE,
                 upsample_strength: float = DEFAULT_UPSAMPLE_STRENGTH, callback_on_step_end=None,
                 pipeline: str | None = None, models: dict | None = None, device=None, dtype=None):
        """Denoise `image` from step round(strength * steps) towards `prompt`.

        Defaults (pipelines/defaults.py): ancestral "ddpm" over "ddim15", guidance 5.0 at t >= 300; the
        upsampler stage runs DDIM from min(strength, upsample_strength), starting from the known
        pixels and, where the image is regenerated, the enlarged base result.
        upsample: None = through the upsampler when there is one and the working crop is at least
          its output size (the 64→256 cascade, starting at the same strength); True/False force it.
        pipeline/models/device/dtype/num_threads: accepted so that `**result.params` replays the
          call (num_threads sets the CPU thread count for the call; see base.reproducible).
        """
        t_start = time.perf_counter()
        timings: dict = {}
        # 1. Check inputs
        self._start(num_images, guidance_scale, sampler, pipeline)
        self.check_inputs(prompt, negative_prompt, strength, mask_blur, padding, num_images, num_inference_steps,
                          sampler, guidance_scale, guidance_min_t, upsample, upsample_steps, upsample_sampler,
                          upsample_temperature, upsample_strength)
        seed, warnings = resolve_seed(seed, generator)
        # 2. Read the image (and the mask: white = regenerate)
        image_arr = to_rgb_array(image)
        masked = mask_image is not None
        if masked:
            crop = self._crop_around_mask(image_arr, mask_image, padding=padding, mask_blur=mask_blur,
                                          warnings=warnings,
                                          if_empty="the mask is empty (no pixel is white; transparent ones "
                                                   "count as black): there is nothing to change; paint the area "
                                                   "to edit in white, or pass no mask to edit the whole image")
        else:
            crop = MaskedCrop.build(image_arr, np.ones(image_arr.shape[:2], bool), padding=0, mask_blur=0)
        # 3. Pick the models: the base model (an inpainting model works too, without its extra channels)
        base_role = self.store.require("base", "base-inpaint")
        up_role = self._resolve_upsample(upsample, crop.side, ("upsampler", "upsampler-inpaint"))
        roles = {"base": base_role, **({"upsampler": up_role} if up_role else {})}
        params = self._header(seed, {k: self.store.model_id(r) for k, r in roles.items()})
        params.update(prompt=prompt, negative_prompt=negative_prompt, strength=float(strength),
                      mask_blur=mask_blur, padding=int(padding), num_images=int(num_images),
                      num_inference_steps=num_inference_steps, sampler=sampler, guidance_scale=float(guidance_scale),
                      guidance_min_t=int(guidance_min_t), upsample=up_role is not None, upsample_steps=upsample_steps,
                      upsample_sampler=upsample_sampler, upsample_temperature=float(upsample_temperature),
                      upsample_strength=float(upsample_strength))
        # 4. Noise to t_start, denoise, paste back (inside the mask only when there is one)
        return self._masked_edit(image=image_arr, crop=crop, masked=masked, warnings=warnings, params=params,
                                 recorded=(models, device, dtype), base_role=base_role, base_channels=False,
                                 up_role=up_role, up_channels=False, callback_on_step_end=callback_on_step_end,
                                 timings=timings, t_start=t_start)
