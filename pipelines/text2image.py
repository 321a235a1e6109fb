"""Text-to-image: the 64x64 base model with classifier-free guidance, then the text-conditional
64→256 upsampler conditioned on the base output quantised to 8 bits (GLIDE §4; unguided, noise
scaled by 0.997 as in the reference's text2im notebook). The upsampler starts part-way, from the
noised bicubic enlargement of the base output (`upsample_strength`, pipelines/defaults.py);
upsample_strength=1 with upsample_steps="fast27" is the notebook's setting."""

from __future__ import annotations

import time

import torch

from .base import (BasePipeline, PipelineInputError, PipelineOutput, _Progress, check_prompt, check_sampling_args,
                   denoise, encode_prompt, enlarge, initial_x, make_generator, parse_steps, quantize,
                   reproducible, resolve_seed, tensor_to_pil, upsampler_steps)
from .defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_MIN_T, DEFAULT_SAMPLER, DEFAULT_STEPS,
                       DEFAULT_UPSAMPLE_SAMPLER, DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH,
                       DEFAULT_UPSAMPLE_TEMPERATURE)


class Text2ImagePipeline(BasePipeline):
    name = "text2image"

    def check_inputs(self, prompt, negative_prompt, num_images, num_inference_steps, sampler, guidance_scale,
                     guidance_min_t, upsample, upsample_steps, upsample_sampler, upsample_temperature,
                     upsample_strength):
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative_prompt")
        check_sampling_args(num_images, num_inference_steps, sampler, guidance_scale, guidance_min_t, upsample_steps,
                            upsample_sampler, upsample_temperature, upsample_strength)
        if not isinstance(upsample, bool):
            raise PipelineInputError(f"upsample must be True or False, got {upsample!r}")

    @reproducible
    @torch.inference_mode()
    def __call__(self, prompt: str, negative_prompt: str = "", num_images: int = 1,
                 num_inference_steps: int | str = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                 guidance_scale: float = DEFAULT_GUIDANCE, guidance_min_t: int = DEFAULT_GUIDANCE_MIN_T,
                 generator=None, seed: int | None = None,
                 upsample: bool = True, upsample_steps: int | str = DEFAULT_UPSAMPLE_STEPS,
                 upsample_sampler: str = DEFAULT_UPSAMPLE_SAMPLER,
                 upsample_temperature: float = DEFAULT_UPSAMPLE_TEMPERATURE,
                 upsample_strength: float = DEFAULT_UPSAMPLE_STRENGTH, callback_on_step_end=None,
                 pipeline: str | None = None, models: dict | None = None, device=None, dtype=None) -> PipelineOutput:
        """Generate `num_images` images for `prompt` (256x256 with an upsampler, else base size).

        num_inference_steps: an int or a respacing string ("100", "fast27", "ddim25"); the defaults
          (ancestral "ddpm" over "ddim15", guidance 5.0) live in pipelines/defaults.py.
        guidance_min_t: guidance runs at timesteps t >= this only; below it the conditional model runs
          alone, at about 60% of a guided step's cost (0 = guidance at every step, as GLIDE).
        negative_prompt: the unconditional rows of guidance (default: the empty prompt).
        upsample_strength: the upsampler runs the lowest round(strength * n) of its n steps, from the
          noised bicubic enlargement of the base output; 1 = from pure noise (the reference).
        callback_on_step_end(step, num_steps, preview): after every step of both stages.
        pipeline/models/device/dtype/num_threads: accepted so that `**result.params` replays the
          call (num_threads sets the CPU thread count for the call; see base.reproducible).
        """
        t_start = time.perf_counter()
        timings: dict = {}
        # 1. Check inputs
        self._start(num_images, guidance_scale, sampler, pipeline)
        self.check_inputs(prompt, negative_prompt, num_images, num_inference_steps, sampler, guidance_scale,
                          guidance_min_t, upsample, upsample_steps, upsample_sampler, upsample_temperature,
                          upsample_strength)
        seed, warnings = resolve_seed(seed, generator)
        # 2. Models: base (an inpainting model with nothing known works too) and the optional upsampler
        base_role = self.store.require("base", "base-inpaint")
        up_role = self.store.first_available("upsampler", "upsampler-inpaint") if upsample else None
        if upsample and up_role is None:
            warnings.append(f"no upsampler model in {self.store.path}: returning the base model's resolution")
        base_model = self._load(base_role, timings)
        up_model = self._load(up_role, timings) if up_role else None
        model_ids = {"base": self.store.model_id(base_role)}
        if up_role:
            model_ids["upsampler"] = self.store.model_id(up_role)
        params = self._header(seed, model_ids, base_model)
        params.update(prompt=prompt, negative_prompt=negative_prompt, num_images=int(num_images),
                      num_inference_steps=num_inference_steps, sampler=sampler, guidance_scale=float(guidance_scale),
                      guidance_min_t=int(guidance_min_t), upsample=up_role is not None, upsample_steps=upsample_steps,
                      upsample_sampler=upsample_sampler, upsample_temperature=float(upsample_temperature),
                      upsample_strength=float(upsample_strength))
        warnings += self._replay_warnings(models, device, dtype, params)
        # 3. Timesteps and the shared step counter
        timesteps = parse_steps(num_inference_steps)
        timesteps_up, up_full = upsampler_steps(upsample_steps, upsample_strength) if up_model else ([], True)
        progress = _Progress(len(timesteps) + len(timesteps_up), callback_on_step_end, self.interrupt_event)
        generator = make_generator(seed)
        B = num_images
        # 4. Base stage with classifier-free guidance (one forward on [prompt rows; uncond rows])
        tokens, w = encode_prompt(base_model, prompt, negative_prompt, B, guidance_scale != 1)
        warnings += w
        S = base_model.config.image_size
        t0 = time.perf_counter()
        x = initial_x(base_model, (B, 3, S, S), generator, timesteps=timesteps, image=None, full=True)
        x = denoise(base_model, tokens=tokens, guidance_scale=guidance_scale, sampler=sampler, timesteps=timesteps,
                    x_start=x, generator=generator, progress=progress, guidance_min_t=guidance_min_t)
        timings["base_s"] = time.perf_counter() - t0
        # 5. Upsampler stage: unguided, conditioned on the quantised base output, starting from its enlargement
        if up_model is not None:
            tokens_up, w = encode_prompt(up_model, prompt, "", B, False)
            warnings += [m for m in w if m not in warnings]
            U = up_model.config.image_size
            t0 = time.perf_counter()
            low_res = quantize(x)
            x_up = initial_x(up_model, (B, 3, U, U), generator, timesteps=timesteps_up, image=enlarge(low_res, U),
                             full=up_full, temperature=upsample_temperature)
            x = denoise(up_model, tokens=tokens_up, guidance_scale=1.0, sampler=upsample_sampler,
                        timesteps=timesteps_up, x_start=x_up, generator=generator, progress=progress,
                        low_res=low_res, stage="upsampler")
            timings["upsample_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        timings["per_image_s"] = timings["total_s"] / B
        return PipelineOutput(tensor_to_pil(x), params, None, warnings, timings, None, x.shape[-1])
