"""Tests for pipelines.diffusion: schedules, respacing, samplers on an analytic denoiser,
classifier-free guidance and the training loss. CPU only, a few seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.diffusion import (
    Schedule,
    classifier_free_guidance,
    make_schedule,
    respace,
    sample,
    training_losses,
)
from pipelines.diffusion import schedule as schedule_module

REFERENCE_MAPS = Path(__file__).parents[2] / "shared/reference/glide/timestep_maps.json"

# --------------------------------------------------------------------------- schedules and respacing


def test_schedules_match_hard_coded_reference_values():
    cosine = make_schedule("squaredcos_cap_v2")
    assert cosine.name == "squaredcos_cap_v2" and cosine.num_timesteps == 1000
    assert cosine.betas[0] == pytest.approx(4.128422482196914e-05, rel=1e-12)
    assert cosine.betas[-1] == 0.999
    assert int((cosine.betas >= 0.999).sum()) == 1
    assert cosine.alphas_cumprod[-1] == pytest.approx(2.4287669070348567e-09, rel=1e-9)
    linear = make_schedule("linear")
    assert linear.betas[0] == pytest.approx(1e-4, rel=1e-12) and linear.betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert linear.alphas_cumprod[-1] == pytest.approx(4.035829765375676e-05, rel=1e-9)
    assert make_schedule("linear", 100).betas[0] == pytest.approx(1e-3, rel=1e-12)  # scale = 1000 / T
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        make_schedule("cosine")


def test_respace_matches_hard_coded_reference_lists():
    assert respace(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert respace(1000, 10) == respace(1000, "10")
    assert respace(1000, "fast27") == [
        0, 22, 44, 66, 88, 111, 133, 155, 177, 199, 200, 222, 244, 266, 288, 311, 333, 355, 377, 399,
        400, 500, 599, 600, 799, 800, 997,
    ]  # fmt: skip
    assert respace(1000, "10,10,3,2,2") == respace(1000, "fast27")[:-1] + [999]
    assert respace(1000, "100")[:8] == [0, 10, 20, 30, 40, 50, 61, 71]  # banker's rounding
    assert respace(1000, "100")[-3:] == [979, 989, 999]
    assert respace(1000, "ddim25") == list(range(0, 1000, 40))
    assert respace(1000, "") == list(range(1000))


@pytest.mark.parametrize("spec", ["abc", "ddimx", "ddim1", "1001", "0", "1,,2", "-3", -3, 2.5, None])
def test_respace_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        respace(1000, spec)


def test_respace_error_says_what_is_allowed():
    with pytest.raises(ValueError, match="ddimN"):
        respace(1000, "quick")


@pytest.mark.skipif(not REFERENCE_MAPS.exists(), reason=f"reference file {REFERENCE_MAPS} not present")
def test_schedules_and_respacing_match_reference_file():
    reference = json.loads(REFERENCE_MAPS.read_text())
    for name in ("squaredcos_cap_v2", "linear"):
        schedule = make_schedule(name)
        assert schedule.betas[0] == reference[name]["beta_first"]
        assert schedule.betas[-1] == reference[name]["beta_last"]
        assert schedule.betas.max() == reference[name]["beta_max"]
        assert int((schedule.betas >= 0.999).sum()) == reference[name]["n_clipped_at_0p999"]
        assert schedule.alphas_cumprod[0] == reference[name]["alphas_cumprod_first"]
        assert schedule.alphas_cumprod[-1] == reference[name]["alphas_cumprod_last"]
    for spec, kept in reference["timestep_maps_T1000"].items():
        assert respace(1000, spec) == kept, spec


def test_q_sample_and_x0_eps_round_trip():
    schedule = make_schedule("squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 2, 2, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 2, 2, generator=generator)
    t = torch.tensor([0, 10, 500, 900])
    x_t = schedule.q_sample(x0, t, noise)
    abar = torch.tensor(schedule.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, noise), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0), noise, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- analytic toy denoiser

# Data: every pixel independently ~ 0.3 N(-0.5, 0.15^2) + 0.7 N(0.4, 0.1^2).
WEIGHTS = (0.3, 0.7)
MEANS = (-0.5, 0.4)
STDS = (0.15, 0.1)


def mixture_model_fn(schedule: Schedule):
    """The exact eps-prediction E[eps | x_t] for the Gaussian-mixture data:
    eps = -sqrt(1 - abar) * score(x_t), with x_t ~ sum_k w_k N(sqrt(abar) mu_k, abar s_k^2 + 1 - abar)."""
    alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod[t.cpu()].view(-1, *([1] * (x.ndim - 1)))
        x = x.double()
        log_density, score_terms = [], []
        for weight, mu, std in zip(WEIGHTS, MEANS, STDS):
            mean, var = abar.sqrt() * mu, abar * std**2 + (1 - abar)
            log_density.append(math.log(weight) - 0.5 * torch.log(var) - 0.5 * (x - mean) ** 2 / var)
            score_terms.append((x - mean) / var)  # minus the component's score
        upper = torch.sigmoid(log_density[1] - log_density[0])  # posterior weight of component 1
        return ((1 - abar).sqrt() * ((1 - upper) * score_terms[0] + upper * score_terms[1])).float()

    return model_fn


def mixture_errors(samples: torch.Tensor, *, weight_tol=0.03, mean_tol=0.03, std_rel_tol=0.15) -> list[str]:
    """What is wrong with `samples` as draws from the mixture (empty list if nothing)."""
    values = samples.flatten().double()
    upper = values > -0.05  # the components are > 3 std away from this split
    errors = []
    weight = upper.double().mean().item()
    if abs(weight - WEIGHTS[1]) > weight_tol:
        errors.append(f"weight {weight:.3f} vs {WEIGHTS[1]}")
    for component, members in ((0, values[~upper]), (1, values[upper])):
        mean, std = members.mean().item(), members.std().item()
        if abs(mean - MEANS[component]) > mean_tol:
            errors.append(f"component {component} mean {mean:.3f} vs {MEANS[component]}")
        if abs(std / STDS[component] - 1) > std_rel_tol:
            errors.append(f"component {component} std {std:.3f} vs {STDS[component]}")
    return errors


def log_snr_uniform(schedule: Schedule, count: int) -> list[int]:
    """`count` original timesteps evenly spaced in log-SNR (DPM-Solver's 'logSNR' spacing): a grid
    from t=0 to t=T-2 plus t=T-1, whose capped beta puts it far out on its own."""
    abar = schedule.alphas_cumprod[:-1]
    log_snr = np.log(abar / (1 - abar))
    targets = np.linspace(log_snr[-1], log_snr[0], count - 1)
    kept = sorted({int(np.argmin(np.abs(log_snr - target))) for target in targets} | {schedule.num_timesteps - 1})
    assert len(kept) == count, "grid too fine for the schedule"
    return kept


def _run_mixture(method: str, timesteps: list[int], rows: int = 2000, seed: int = 0, **kwargs) -> torch.Tensor:
    schedule = make_schedule("squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, 3, 1, 1, generator=generator)
    return sample(
        mixture_model_fn(schedule), noise, schedule=schedule, timesteps=timesteps, method=method, generator=generator, **kwargs
    )


COSINE = make_schedule("squaredcos_cap_v2")


@pytest.mark.parametrize(
    "method, timesteps",
    [
        ("ddpm", respace(1000, "")),
        ("ddpm", respace(1000, "100")),
        ("ddim", respace(1000, "50")),
        ("dpm++", log_snr_uniform(COSINE, 20)),
    ],
    ids=["ddpm-1000", "ddpm-100", "ddim-50", "dpm++-20"],
)
def test_samplers_reproduce_gaussian_mixture(method, timesteps):
    samples = _run_mixture(method, timesteps)
    assert samples.shape == (2000, 3, 1, 1) and samples.dtype == torch.float32
    assert mixture_errors(samples) == []


def _shifted_alphas_cumprod_prev(process):
    """Off by one kept step: abar_{k-2} where abar_{k-1} belongs."""
    return np.append([1.0, 1.0], process.alphas_cumprod[:-2])[: len(process)]


_correct_posterior_variance = schedule_module.SpacedProcess.posterior_variance.fget


@pytest.mark.parametrize(
    "attribute, broken",
    [
        ("alphas_cumprod_prev", _shifted_alphas_cumprod_prev),
        ("posterior_variance", lambda process: 2.0 * _correct_posterior_variance(process)),
        ("posterior_variance", lambda process: 0.5 * _correct_posterior_variance(process)),
    ],
    ids=["abar_prev-off-by-one", "variance-x2", "variance-x0.5"],
)
@pytest.mark.filterwarnings("ignore:divide by zero")  # the broken abar_prev makes a variance 0
def test_mixture_check_catches_a_broken_posterior(monkeypatch, attribute, broken):
    """The tolerances above are tight enough to fail a sampler with a broken posterior."""
    monkeypatch.setattr(schedule_module.SpacedProcess, attribute, property(broken))
    assert mixture_errors(_run_mixture("ddpm", respace(1000, "100"))) != []


def test_dpmpp_is_second_order():
    """On log-SNR-uniform steps DPM-Solver++(2M) tracks the probability-flow ODE (DDIM with all
    1000 steps) several times more closely than first-order DDIM with the same steps."""
    exact = _run_mixture("ddim", respace(1000, ""), rows=300)
    steps = log_snr_uniform(COSINE, 20)
    dpmpp_error = (_run_mixture("dpm++", steps, rows=300) - exact).abs().mean()
    ddim_error = (_run_mixture("ddim", steps, rows=300) - exact).abs().mean()
    assert dpmpp_error < 0.4 * ddim_error


@pytest.mark.parametrize("spec", ["10", "15", "20"])
def test_dpmpp_does_not_overshoot_on_uniform_steps(spec):
    """On plain respace steps the last update jumps far in log-SNR (t=53 -> 0 for "20"); a
    second-order extrapolation there pushed the component means outwards (-0.56 for -0.5 at "20").
    The spread is checked loosely: one model evaluation across that jump returns about
    E[x_0 | x_t], narrower than the data (std ~0.078 for 0.1 at "20"; DDIM loses it as well)."""
    samples = _run_mixture("dpm++", respace(1000, spec))
    assert mixture_errors(samples, std_rel_tol=0.25) == []


def _prescribed_x0_model(schedule: Schedule, target_x0):
    """A model whose x_0 prediction at timestep t is target_x0(t) whatever x is."""
    alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)

    def model_fn(x, t):
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = torch.tensor([target_x0(int(step)) for step in t], dtype=torch.float64).view(-1, 1, 1, 1)
        return ((x.double() - abar.sqrt() * x0) / (1 - abar).sqrt()).float()

    return model_fn


def test_dpmpp_follows_algorithm_2_on_uneven_steps():
    """Lu et al. 2022, Algorithm 2, written out in float64 for one pixel whose x_0 prediction is
    prescribed, on steps whose log-SNR gaps differ (so r_i = h_{i-1} / h_i matters); first order
    on the first update and on the final one into the smallest kept timestep ("lower order final")."""
    timesteps = [0, 50, 300, 700, 950]

    def target_x0(t):
        return 0.5 * math.cos(t / 200)

    trajectory = []
    sample(_prescribed_x0_model(COSINE, target_x0), torch.full((1, 1, 1, 1), 0.7), schedule=COSINE,
           timesteps=timesteps, method="dpm++", clip_denoised=False,
           callback=lambda info: trajectory.append(info["x"].item()))  # fmt: skip

    descending = timesteps[::-1]
    abar = COSINE.alphas_cumprod[descending]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    x, expected, previous = 0.7, [], None
    for i in range(len(descending) - 1):
        h = lam[i + 1] - lam[i]
        data = target_x0(descending[i])
        if previous is None or i == len(descending) - 2:
            d = data
        else:
            r = previous[1] / h
            d = (1 + 1 / (2 * r)) * data - 1 / (2 * r) * previous[0]
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (math.exp(-h) - 1) * d
        expected.append(x)
        previous = (data, h)
    expected.append(target_x0(0))
    assert trajectory == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++"])
def test_clip_follows_denoised_fn(method):
    """denoised_fn runs first, then the [-1, 1] clamp (the reference's order)."""
    model_fn = _prescribed_x0_model(COSINE, lambda t: 0.5)
    kwargs = dict(schedule=COSINE, timesteps=respace(1000, "5"), method=method, generator=torch.Generator())
    out = sample(model_fn, torch.zeros(1, 1, 1, 1), denoised_fn=lambda x0: x0 + 1.0, **kwargs)
    assert out.item() == 1.0
    unclipped = sample(model_fn, torch.zeros(1, 1, 1, 1), denoised_fn=lambda x0: x0 + 1.0, clip_denoised=False, **kwargs)
    assert unclipped.item() == pytest.approx(1.5, abs=1e-4)


# --------------------------------------------------------------------------- variance, callbacks, determinism


def _zero_input_variances(v_value: float | None, timesteps: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Per-step noise variance of ddpm: the model predicts eps = 0 (and v = v_value), and the
    callback resets x to 0 after every step, so each step's x is exactly std * z."""
    schedule = make_schedule("squaredcos_cap_v2")
    shape = (2, 3, 2, 2)

    def model_fn(x, t):
        eps = torch.zeros_like(x)
        return eps if v_value is None else torch.cat([eps, torch.full_like(x, v_value)], dim=1)

    steps = []
    sample(
        model_fn,
        torch.zeros(shape),
        schedule=schedule,
        timesteps=timesteps,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda info: steps.append(info["x"]) or torch.zeros(shape),
    )
    replay = torch.Generator().manual_seed(seed)
    z = [torch.randn(shape, generator=replay) for _ in steps[:-1]]  # no noise at the last step
    return [(x / noise).square() for x, noise in zip(steps, z)]


def test_learned_range_variance_endpoints():
    timesteps = respace(1000, "10")
    abar = COSINE.alphas_cumprod[timesteps]
    abar_prev = abar[:-1]  # kept step k goes from timesteps[k] to timesteps[k-1]
    betas = 1 - abar[1:] / abar_prev
    posterior = betas * (1 - abar_prev) / (1 - abar[1:])
    expected_by_step = {"posterior": posterior[::-1], "beta": betas[::-1]}  # steps run high t first
    for v_value, expected in ((-1.0, "posterior"), (1.0, "beta"), (None, "posterior")):
        variances = _zero_input_variances(v_value, timesteps)
        assert len(variances) == len(timesteps) - 1
        for variance, want in zip(variances, expected_by_step[expected]):
            torch.testing.assert_close(variance, torch.full_like(variance, float(want)), rtol=1e-5, atol=0)
    midpoint = _zero_input_variances(0.0, timesteps)[0]
    geometric_mean = math.sqrt(posterior[-1] * betas[-1])
    torch.testing.assert_close(midpoint, torch.full_like(midpoint, geometric_mean), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++"])
def test_denoised_fn_keeps_known_pixels_exactly(method):
    schedule = make_schedule("squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(3)
    known = torch.rand(4, 3, 4, 4, generator=generator) * 2 - 1
    mask = torch.zeros(4, 1, 4, 4)
    mask[:, :, :2] = 1  # top half known
    out = sample(
        mixture_model_fn(schedule),
        torch.randn(4, 3, 4, 4, generator=generator),
        schedule=schedule,
        timesteps=respace(1000, "25"),
        method=method,
        generator=generator,
        denoised_fn=lambda x0: x0 * (1 - mask) + known * mask,
    )
    assert torch.equal(out[:, :, :2], known[:, :, :2])
    assert not torch.equal(out[:, :, 2:], known[:, :, 2:])


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++"])
def test_callback_reports_each_step_and_can_replace_x(method):
    schedule = make_schedule("linear")
    timesteps = respace(1000, "10")[:6]  # a prefix, as SDEdit uses
    seen_inputs, infos = [], []

    def model_fn(x, t):
        seen_inputs.append((x.clone(), t.clone()))
        return 0.1 * x

    def callback(info):
        infos.append(info)
        if info["i"] == 2:
            return torch.full_like(info["x"], 0.123)
        return None

    sample(model_fn, torch.ones(2, 3, 1, 1), schedule=schedule, timesteps=timesteps, method=method,
           generator=torch.Generator().manual_seed(0), callback=callback)  # fmt: skip
    assert [info["i"] for info in infos] == list(range(6))
    assert all(info["n"] == 6 for info in infos)
    assert [info["t"] for info in infos] == timesteps[::-1]
    assert [info["t_next"] for info in infos] == timesteps[::-1][1:] + [-1]
    assert [t.tolist() for _, t in seen_inputs] == [[t, t] for t in timesteps[::-1]]
    assert torch.equal(seen_inputs[0][0], torch.ones(2, 3, 1, 1))
    assert torch.equal(seen_inputs[3][0], torch.full((2, 3, 1, 1), 0.123))
    assert all(set(info) >= {"i", "n", "t", "x", "denoised"} for info in infos)


def test_generator_determinism_and_no_global_rng():
    schedule = make_schedule("squaredcos_cap_v2")
    model_fn = mixture_model_fn(schedule)
    noise = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample(model_fn, noise, schedule=schedule, timesteps=respace(1000, "20"), generator=generator)

    global_state = torch.get_rng_state()
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_low_precision_model_output_is_accepted():
    schedule = make_schedule("squaredcos_cap_v2")
    model_fn = mixture_model_fn(schedule)
    noise = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    kwargs = dict(schedule=schedule, timesteps=respace(1000, "10"), method="ddim")
    upcast = sample(lambda x, t: model_fn(x, t).bfloat16().float(), noise, **kwargs)
    low = sample(lambda x, t: model_fn(x, t).bfloat16(), noise, **kwargs)
    assert low.dtype == torch.float32
    assert torch.equal(low, upcast)  # the maths runs in float32 whatever the model returns


def test_sample_rejects_bad_arguments():
    schedule = make_schedule("linear")
    noise = torch.zeros(1, 3, 1, 1)
    with pytest.raises(ValueError, match="ddim"):
        sample(torch.zeros_like, noise, schedule=schedule, timesteps=[0, 1], method="euler")
    with pytest.raises(ValueError, match="ascending"):
        sample(torch.zeros_like, noise, schedule=schedule, timesteps=[5, 1])
    with pytest.raises(ValueError, match="channels"):
        sample(lambda x, t: torch.zeros(1, 4, 1, 1), noise, schedule=schedule, timesteps=[0, 1])


# --------------------------------------------------------------------------- classifier-free guidance


def _doubled_batch_model(calls: list[int]):
    """A fake conditional model with a bound [cond; uncond] batch of 2 x 2 rows: row r adds
    offset[r] to eps and reports offset[r] * 10 in the variance channels."""
    offsets = torch.tensor([1.0, 2.0, -1.0, -3.0]).view(-1, 1, 1, 1)

    def model_fn(x, t):
        calls.append(x.shape[0])
        offset = offsets[: x.shape[0]]
        return torch.cat([x + offset, 10 * offset.expand_as(x)], dim=1)

    return model_fn, offsets


def test_cfg_scale_one_is_exactly_the_conditional_model():
    calls = []
    model_fn, _ = _doubled_batch_model(calls)
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([5, 5])
    guided = classifier_free_guidance(model_fn, 1.0)
    assert torch.equal(guided(x, t), model_fn(x, t))
    assert calls == [2, 2]  # B rows: the uncond half never runs


def test_cfg_combines_eps_and_leaves_variance_unguided():
    calls = []
    model_fn, offsets = _doubled_batch_model(calls)
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([5, 5])
    out = classifier_free_guidance(model_fn, 4.0)(x, t)
    cond, uncond = x + offsets[:2], x + offsets[2:]
    torch.testing.assert_close(out[:, :3], uncond + 4.0 * (cond - uncond))
    assert torch.equal(out[:, 3:], (10 * offsets[:2]).expand_as(x))
    assert calls == [4]


def test_cfg_runs_one_doubled_forward_per_step():
    calls = []
    model_fn, _ = _doubled_batch_model(calls)
    timesteps = respace(1000, "10")
    sample(classifier_free_guidance(model_fn, 3.0), torch.randn(2, 3, 2, 2), schedule=make_schedule("linear"),
           timesteps=timesteps, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert calls == [4] * len(timesteps)


def test_cfg_interval_runs_the_conditional_model_alone_below_min_t():
    calls = []
    model_fn, _ = _doubled_batch_model(calls)
    timesteps = respace(1000, "10")
    seen = []

    def counting(x, t):
        seen.append(int(t[0]))
        return model_fn(x, t)

    sample(classifier_free_guidance(counting, 3.0, min_t=500), torch.randn(2, 3, 2, 2),
           schedule=make_schedule("linear"), timesteps=timesteps, generator=torch.Generator().manual_seed(0))
    assert calls == [4 if t >= 500 else 2 for t in seen] and 2 in calls and 4 in calls
    guided = classifier_free_guidance(model_fn, 3.0, min_t=500)
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(guided(x, torch.tensor([499, 499])), model_fn(x, torch.tensor([499, 499])))
    assert not torch.equal(guided(x, torch.tensor([500, 500]))[:, :3], model_fn(x, torch.tensor([500, 500]))[:, :3])


# --------------------------------------------------------------------------- training loss


def _training_batch(schedule_name="squaredcos_cap_v2", batch=4):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(10, 246, (batch, 3, 4, 4), generator=generator) / 127.5 - 1  # on the 8-bit grid
    noise = torch.randn(x0.shape, generator=generator)
    return make_schedule(schedule_name), x0, noise


def test_training_losses_shapes_and_mse():
    schedule, x0, noise = _training_batch()
    t = torch.tensor([0, 1, 500, 999])
    raw = torch.randn(4, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    terms = training_losses(lambda x, t: raw, x0, t, schedule, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    torch.testing.assert_close(terms["mse"], ((noise - raw[:, :3]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] > 0).all()

    eps_only = training_losses(lambda x, t: raw[:, :3], x0, t, schedule, noise=noise)
    assert torch.equal(eps_only["vb"], torch.zeros(4))
    torch.testing.assert_close(eps_only["loss"], terms["mse"])


def test_training_losses_draws_noise_from_generator():
    schedule, x0, _ = _training_batch()
    t = torch.tensor([3, 30, 300, 900])

    def model_fn(x, t):
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    def losses(seed):
        return training_losses(model_fn, x0, t, schedule, generator=torch.Generator().manual_seed(seed))["loss"]

    assert torch.equal(losses(0), losses(0))
    assert not torch.equal(losses(0), losses(1))


def test_vb_trains_only_the_variance():
    """L_hybrid's stop-gradient: the VLB term reaches v but not eps."""
    schedule, x0, noise = _training_batch()
    raw = torch.randn(4, 6, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    terms = training_losses(lambda x, t: raw, x0, torch.tensor([0, 7, 70, 700]), schedule, noise=noise)
    terms["vb"].sum().backward()
    assert torch.equal(raw.grad[:, :3], torch.zeros(4, 3, 4, 4))
    assert raw.grad[:, 3:].abs().sum() > 0


def test_vb_of_the_true_posterior():
    """With eps = the true noise and v = -1 the model is the true posterior: KL = 0 for t > 0, and at
    t = 0 the vb is the discretised Gaussian decoder NLL (bits) with variance beta~_1."""
    schedule, x0, noise = _training_batch("linear")
    t = torch.tensor([0, 1, 200, 999])
    terms = training_losses(lambda x, t: torch.cat([noise, -torch.ones_like(noise)], 1), x0, t, schedule, noise=noise)
    torch.testing.assert_close(terms["vb"][1:], torch.zeros(3), atol=1e-5, rtol=0)

    abar = schedule.alphas_cumprod
    beta_1 = 1 - abar[1] / abar[0]
    std = math.sqrt(beta_1 * (1 - abar[0]) / (1 - abar[1]))
    half_bin = 1 / 255 / (std * math.sqrt(2))
    nll_bits = -math.log2(0.5 * (math.erf(half_bin) - math.erf(-half_bin)))  # x0 interior, mean = x0
    assert terms["vb"][0].item() == pytest.approx(nll_bits, rel=1e-3)
