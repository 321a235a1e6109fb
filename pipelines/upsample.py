"""The text-conditional upsampler on its own: any small image → the upsampler's resolution
(64→256 for GLIDE). The image is resized (Lanczos) to a quarter of the output size, quantised to
8 bits as in the cascade, and the upsampler runs unguided with noise x 0.997 (the reference's
settings), starting part-way from the noised bicubic enlargement (`strength`; 1 = from pure noise,
which with num_inference_steps="fast27" is the reference's setting)."""

from __future__ import annotations

import time

import torch

from .base import (BasePipeline, PipelineOutput, _Progress, array_to_tensor, check_common, check_prompt,
                   check_strength, check_temperature, denoise, encode_prompt, enlarge, initial_x, make_generator,
                   parse_steps, reproducible, resize_rgb, resolve_seed, tensor_to_pil, to_rgb_array, upsampler_steps)
from .defaults import (DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH,
                       DEFAULT_UPSAMPLE_TEMPERATURE)


class UpsamplePipeline(BasePipeline):
    name = "upsample"

    def check_inputs(self, prompt, negative_prompt, num_images, num_inference_steps, sampler, guidance_scale,
                     temperature, strength):
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative_prompt")
        check_common(num_images, guidance_scale, sampler)
        parse_steps(num_inference_steps)
        check_temperature(temperature, "temperature")
        check_strength(strength)

    @reproducible
    @torch.inference_mode()
    def __call__(self, prompt: str, image, *, negative_prompt: str = "", num_images: int = 1,
                 num_inference_steps: int | str = DEFAULT_UPSAMPLE_STEPS, sampler: str = DEFAULT_UPSAMPLE_SAMPLER,
                 temperature: float = DEFAULT_UPSAMPLE_TEMPERATURE, strength: float = DEFAULT_UPSAMPLE_STRENGTH,
                 guidance_scale: float = 1.0, generator=None, seed: int | None = None, callback_on_step_end=None,
                 pipeline: str | None = None, models: dict | None = None, device=None, dtype=None) -> PipelineOutput:
        """Upsample `image` following `prompt`; guidance_scale 1 = unguided (the reference).
        strength: run the lowest round(strength * n) of the n steps, from the noised bicubic
          enlargement of the input; 1 = from pure noise.
        pipeline/models/device/dtype/num_threads: accepted so that `**result.params` replays the call."""
        t_start = time.perf_counter()
        timings: dict = {}
        # 1. Check inputs
        self._start(num_images, guidance_scale, sampler, pipeline)
        self.check_inputs(prompt, negative_prompt, num_images, num_inference_steps, sampler, guidance_scale,
                          temperature, strength)
        seed, warnings = resolve_seed(seed, generator)
        # 2. Model and the low-resolution input
        role = self.store.require("upsampler", "upsampler-inpaint")
        model = self._load(role, timings)
        params = self._header(seed, {"upsampler": self.store.model_id(role)}, model)
        params.update(prompt=prompt, negative_prompt=negative_prompt, num_images=int(num_images),
                      num_inference_steps=num_inference_steps, sampler=sampler, temperature=float(temperature),
                      strength=float(strength), guidance_scale=float(guidance_scale))
        warnings += self._replay_warnings(models, device, dtype, params)
        U = model.config.image_size
        low = U // 4
        arr = to_rgb_array(image)
        h, w = arr.shape[:2]
        if (w, h) != (low, low):
            warnings.append(f"the image is {w}x{h}; the upsampler takes {low}x{low}, so it was resized"
                            + (" (and stretched: it is not square)" if w != h else ""))
        low_res = array_to_tensor(resize_rgb(arr, low))
        # 3. Denoise at the upsampler's resolution
        timesteps, full = upsampler_steps(num_inference_steps, strength)
        progress = _Progress(len(timesteps), callback_on_step_end, self.interrupt_event)
        generator = make_generator(seed)
        B = num_images
        tokens, w = encode_prompt(model, prompt, negative_prompt, B, guidance_scale != 1)
        warnings += w
        t0 = time.perf_counter()
        x = initial_x(model, (B, 3, U, U), generator, timesteps=timesteps, image=enlarge(low_res, U), full=full,
                      temperature=temperature)
        x = denoise(model, tokens=tokens, guidance_scale=guidance_scale, sampler=sampler, timesteps=timesteps,
                    x_start=x, generator=generator, progress=progress, low_res=low_res.expand(B, -1, -1, -1),
                    stage="upsampler")
        timings["upsample_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        timings["per_image_s"] = timings["total_s"] / B
        return PipelineOutput(tensor_to_pil(x), params, None, warnings, timings, None, U)
