"""The sampling defaults of every entry point, in one place.

The pipelines' signatures, the CLI (`python -m pipelines`), the studio's settings panel and its
HTTP API (`api_*`) all read them from here; change a default here and nowhere else. `steps_from_text`
reads a steps value typed as text the same way for all of them.
This module imports nothing: the studio reads it before torch is imported (its page is served first).

Sampler: the shipped default models (assets/models) are undertrained; with them the deterministic
samplers (DDIM, DPM-Solver++) leave speckle noise while ancestral DDPM gives clean shapes
(measured on the 2-core CPU: ddpm 25 steps ~ 3.2 s/image, dpm++ 15 steps ~ 2.7 s/image).

Steps: "ddim15" keeps 15 timesteps at one stride from 0 (0, 67, ..., 938), so it never runs t = 999,
where the cosine schedule's alpha-bar is 2.4e-9 and the x_0 implied by an eps prediction is noise
amplified 20,000x (it plants an off-palette background that later steps keep). On the shapes
benchmark (python -m pipelines.bench.shapes, 60 text-to-image images, 24 SDEdit cases) "ddim15"
matched or beat the even spacing 25 (which includes t = 999) in 40% fewer steps: background
33% vs 8%, colour 26 vs 18%, shape 35 vs 26%, count 35 vs 25%; SDEdit whole prompt 33 vs 29%.
Inpainting keeps 25 evenly spaced steps: with ddim15 its seam score was worse (3.6 vs 2.3).
"""

from __future__ import annotations

SAMPLERS = ("ddpm", "ddim", "dpm++")

DEFAULT_SAMPLER = "ddpm"
DEFAULT_STEPS = "ddim15"  # kept timesteps of the base stage: text-to-image and SDEdit (see above)
DEFAULT_STEPS_INPAINT = 25  # inpainting (an int N means respace(1000, N): N evenly spaced, t = 999 included)
DEFAULT_GUIDANCE = 5.0  # classifier-free guidance scale: text-to-image and SDEdit
# 5 since session 22's base (the GLIDE notebooks use 3): shapes benchmark, 544 text-to-image images, whole prompt
# 57.0% at 5 against 54.0% at 3 (pairs 64.6 vs 60.4%, relations 27.1 vs 24.0%, held-out 36.5 vs 31.2%, single
# 69.8 vs 70.3%); SDEdit, 96 cases, right colour and shape at every blob 67.7 vs 69.8% (whole prompt 74.0% both).
DEFAULT_GUIDANCE_INPAINT = 5.0  # classifier-free guidance scale: inpainting
# Guidance runs at timesteps t >= 300 only (a guidance interval, Kynkäänniemi et al. 2024); below it the
# conditional model runs alone, on half the batch. On the shapes benchmark's 60 text-to-image images (ddim15)
# stopping guidance below t = 300 changed no score but colour (26.1 -> 25.0%, one image) and the pixels by
# 0.27 levels on average, in 5 of 15 steps at 60% of a guided step's cost; stopping below t = 500 lost shape
# 35 -> 28% and object 12.5 -> 10%.
DEFAULT_GUIDANCE_MIN_T = 300
# Fine-tuned inpainting guides only at t >= 700 (the first 8 of its 25 steps). The inpainting model sees the known
# pixels, so guidance is needed only while the object is placed; after that it pushes the surroundings off the
# scene's colours and shows as a seam. The first models (object found in 10% of cases) were best from 900; the
# models shipped since place objects well enough for longer guidance to pay. Shapes benchmark, 96 cases
# (--tasks inpaint --inpaint-cases 96 --guidance-min-t T), found from 900 against 700: 44.8 / 55.2% (the model
# shipped before session 16), 52.1 / 58.3% (its 60-minute fine-tune), 65.6 / 72.9% (then a high-timestep leg),
# 87.5 / 89.6% (the H100 fine-tune of session 17, shipped; from 500 also 89.6%). On 48 cases, the 60-minute
# model from 300 / 500 / 700 found 60.4% each, with seam medians 0.047 / 0.067 / 0.067, so the guided steps
# stop at 700.
# mode="replace" keeps 300: its model sees no context. So does strength < 1, whose run may start lower.
DEFAULT_GUIDANCE_MIN_T_INPAINT = 700
# SDEdit starts at step round(0.8 * steps) of ddim15, t = 804: late enough that the sketch's layout and colours
# stay, early enough that a crude blob can still become the shape the prompt names. Chosen on the shapes
# benchmark's crude-blob cases with the base shipped in session 19 (--tasks sdedit --sdedit-cases 96 --strength S):
# right shape and colour 61.5 / 72.9 / 71.9% at 0.6 / 0.8 / 0.85, the colour at the blob 99.5 / 93.8 / 83.9%.
# (With the bases before it, which read colour words far less at high noise, 0.6 was best.)
DEFAULT_SDEDIT_STRENGTH = 0.8
DEFAULT_MASK_BLUR = 4  # px of the feather band inside the mask edge
DEFAULT_PADDING = 32  # px of context around the mask in the "only masked" working crop

# The upsampler stage: unguided, noise x 0.997 (GLIDE's text2im notebook), but it starts part-way, from the
# bicubic enlargement of its low-resolution input noised to step round(0.4 * 25) = 10 (t = 375), not from pure
# noise over "fast27". The low-resolution input fixes everything but fine detail, which the noise at t = 375
# already drowns. Measured with the shipped upsampler on 12 shapes scenes (python -m pipelines.bench.upsample):
# from noise (fast27) the output is 47 levels away from its input and 14 dB from the true 256 render; from
# strength 0.4 it is 1 level away and 35.5 dB (bicubic: 33.5 dB), in 10 steps instead of 27.
# upsample_strength=1 with upsample_steps="fast27" is the reference setting.
DEFAULT_UPSAMPLE_STEPS = 25
DEFAULT_UPSAMPLE_STRENGTH = 0.4
DEFAULT_UPSAMPLE_SAMPLER = "ddim"
DEFAULT_UPSAMPLE_SAMPLER_INPAINT = "ddpm"  # GLIDE's inpainting notebook samples the upsampler ancestrally
DEFAULT_UPSAMPLE_TEMPERATURE = 0.997


def steps_from_text(value) -> int | str:
    """A steps value typed as text (CLI, studio API): "25" -> 25; a respacing string stays as it is."""
    value = str(value).strip()
    return int(value) if value.isdigit() else value
