"""PlanNet sampler's draws: x0 follows softmax(logits / T) on the ids an attribute may take, the
masked fraction follows t/T with given tokens in place, the random work is one uniform per free
token plus Gumbel noise for revealed tokens only, and one generator per row gives each row what a
batch-1 run with that generator gives (what the server-side loop relies on)."""
from __future__ import annotations

import numpy as np
import pytest

from posterrt.runtime.errors import ContractError, InputError
from posterrt.runtime.schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig

CLASSES = ("product", "title", "subtitle", "button", "logo")  # pad_class = 5: class ids 0..5
#: a pooled chi-square fails above this many standard deviations (Wilson-Hilferty): ~3e-7 one-sided
CHI_SQUARE_Z_LIMIT = 5.0


def _config(**overrides) -> PlanNetSamplerConfig:
    return PlanNetSamplerConfig(CLASSES, **{"num_bins": 16, "num_timesteps": 20, "max_elements": 6, **overrides})


def _chi_square_z(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pooled Pearson chi-square of ``counts`` [positions, K] against ``probabilities`` (same shape;
    zero-probability cells must have zero counts and are left out), as a standard normal deviate by
    the Wilson-Hilferty cube-root approximation (no scipy here). Under the null hypothesis it needs
    >= 5 expected draws per cell; against a wrong distribution it only has to come out large."""
    draws = counts.sum(axis=1, keepdims=True)
    expected = probabilities * draws
    cells = probabilities > 0
    assert counts[~cells].sum() == 0, "a zero-probability class was drawn"
    statistic = (((counts - expected) ** 2)[cells] / expected[cells]).sum()
    dof = int(cells.sum() - len(counts))
    return float(((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof)))


def _softmax(logits: np.ndarray, pad_class: int) -> np.ndarray:
    scores = logits.astype(np.float64).copy()
    scores[..., 0, pad_class + 1:] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_x0_draws_follow_softmax_over_temperature(temperature):
    """One level (steps=1) reveals every token with a draw: 3000 plans x 30 positions on fixed logits.
    The class attribute's invalid ids get the highest logits, so drawing them would show at once."""
    config = _config()
    rng = np.random.default_rng(2024)
    # spread scaled by T: every class keeps >= ~0.5% probability, enough expected draws per cell
    logits = (temperature * rng.uniform(-1.2, 1.2, size=(1, config.max_elements, 5, config.num_bins))).astype(np.float32)
    logits[:, :, 0, config.pad_class + 1:] = 4.0
    batch = 3000
    tokens = PlanNetSampler(config).sample(lambda t, s: np.broadcast_to(logits, (len(t), *logits.shape[1:])), batch,
                                           np.random.default_rng([7, round(temperature * 10)]), steps=1, temperature=temperature)
    counts = np.stack([np.bincount(column, minlength=config.num_bins)
                       for column in tokens.reshape(batch, -1).T]).astype(np.float64)
    expected = _softmax(logits[0] / temperature, config.pad_class).reshape(-1, config.num_bins)
    assert (expected[expected > 0] * batch).min() >= 5, "too few draws per cell for the chi-square approximation"
    z = _chi_square_z(counts, expected)
    assert z < CHI_SQUARE_Z_LIMIT, f"draws differ from softmax(logits / {temperature}): z = {z:.1f}"
    # The same counts against a 25% temperature error must fail: the check has power.
    wrong = _softmax(logits[0] / (temperature * 1.25), config.pad_class).reshape(-1, config.num_bins)
    assert _chi_square_z(counts, wrong) > 3 * CHI_SQUARE_Z_LIMIT
    # ... and so must ignoring the temperature
    if temperature != 1.0:
        assert _chi_square_z(counts, _softmax(logits[0], config.pad_class).reshape(-1, config.num_bins)) > 3 * CHI_SQUARE_Z_LIMIT


def test_temperature_zero_takes_the_argmax_of_valid_ids():
    config = _config()
    logits = np.random.default_rng(3).standard_normal((2, config.max_elements, 5, config.num_bins)).astype(np.float32)
    logits[:, :, 0, config.pad_class + 1:] = 50.0
    tokens = PlanNetSampler(config).sample(lambda t, s: logits, 2, np.random.default_rng(0), steps=4, temperature=0)
    expected = logits.argmax(axis=-1)
    expected[..., 0] = logits[..., 0, :config.pad_class + 1].argmax(axis=-1)
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("steps", [20, 6])
def test_masked_fraction_of_free_tokens_follows_t_over_T(steps):
    """With element 0 given, the free tokens' masked fraction when the denoiser sees level t is t/T
    in expectation: 40 x 24 x 5 = 4800 free tokens, binomial std <= 0.0073, limit 0.03 (> 4 sigma)."""
    config = _config(max_elements=25)
    sampler = PlanNetSampler(config)
    fixed = sampler.blank_tokens(40)
    fixed[:, 0] = [0, 3, 4, 5, 6]
    shown = []

    def model(tokens, timestep):
        np.testing.assert_array_equal(tokens[:, 0], fixed[:, 0])
        shown.append(((tokens[:, 1:] == config.mask_token).mean(), float(timestep[0])))
        return np.zeros((len(tokens), 25, 5, config.num_bins), np.float32)

    sampler.sample(model, 40, np.random.default_rng(11), steps=steps, fixed_tokens=fixed)
    assert len(shown) == steps and shown[0] == (1.0, 20.0)
    for fraction, level in shown:
        assert fraction == pytest.approx(level / config.num_timesteps, abs=0.03), (level, fraction)


class CountingGenerator:
    """A generator that counts the numbers drawn, by kind (the sampler draws uniforms and Gumbels)."""

    def __init__(self, seed):
        self.inner, self.drawn = np.random.default_rng(seed), {"random": 0, "gumbel": 0}

    def random(self, size):
        self.drawn["random"] += int(np.prod(size))
        return self.inner.random(size)

    def gumbel(self, size):
        self.drawn["gumbel"] += int(np.prod(size))
        return self.inner.gumbel(size=size)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_draws_are_one_uniform_per_free_token_and_gumbels_only_for_revealed_ones(temperature):
    """The reveal schedule takes one uniform per free token for the whole loop; each step draws
    Gumbel noise only for the tokens it reveals (each free token once), none at temperature 0."""
    config = _config()
    sampler = PlanNetSampler(config)
    fixed = sampler.blank_tokens(2)
    fixed[:, 0, 0] = 0
    revealed_seen = []

    def model(tokens, timestep):
        revealed_seen.append(int((tokens != config.mask_token).sum()))
        return np.zeros((len(tokens), config.max_elements, 5, config.num_bins), np.float32)

    generator = CountingGenerator(5)
    tokens = sampler.sample(model, 2, generator, fixed_tokens=fixed, temperature=temperature)
    free = int((fixed == config.mask_token).sum())
    assert generator.drawn == {"random": free, "gumbel": free * config.num_bins if temperature else 0}
    assert len(set(revealed_seen)) > 10, "tokens are revealed over many steps, not all at once"
    assert (tokens != config.mask_token).all()


def test_one_generator_per_row_gives_each_row_its_batch_one_plan():
    """Rows batched into one loop with their own generators: each row's tokens and its generator's
    final state equal a batch-1 run's; the denoiser's logits depend on each row's own tokens."""
    config = _config()
    sampler = PlanNetSampler(config)
    base = np.random.default_rng(1).standard_normal((config.max_elements, 5, config.num_bins)).astype(np.float32)

    def model(tokens, timestep):  # row-local: a row's logits follow its own tokens and the level
        return (base + 0.05 * tokens[..., None] + 0.01 * timestep[:, None, None, None]).astype(np.float32)

    seeds = [101, 202, 303]
    fixed = sampler.blank_tokens(3)
    fixed[:, 0, 0] = [0, 1, 2]
    batched = [np.random.default_rng(s) for s in seeds]
    together = sampler.sample(model, 3, batched, steps=9, fixed_tokens=fixed)
    for row, seed in enumerate(seeds):
        alone = np.random.default_rng(seed)
        np.testing.assert_array_equal(together[row:row + 1], sampler.sample(model, 1, alone, steps=9,
                                                                            fixed_tokens=fixed[row:row + 1]))
        assert alone.bit_generator.state == batched[row].bit_generator.state
    with pytest.raises(InputError, match="generator: got 2 generators for 3 rows"):
        sampler.sample(model, 3, batched[:2], steps=9)


def test_non_finite_logits_are_refused_but_minus_infinity_is_probability_zero():
    config = _config()
    logits = np.zeros((1, config.max_elements, 5, config.num_bins), np.float32)
    logits[0, :, 1:, :8] = -np.inf  # box bins 0..7 impossible
    tokens = PlanNetSampler(config).sample(lambda t, s: logits, 1, np.random.default_rng(0), steps=3)
    assert (tokens[..., 1:] >= 8).all()
    for bad in (np.nan, np.inf):
        broken = logits.copy()
        broken[0, 2, 3, 12] = bad
        with pytest.raises(ContractError, match="NaN, \\+Inf or no finite logit"):
            PlanNetSampler(config).sample(lambda t, s: broken, 1, np.random.default_rng(0), steps=1)
    broken = logits.copy()
    broken[0, 2, 3] = -np.inf
    with pytest.raises(ContractError, match="no finite logit"):
        PlanNetSampler(config).sample(lambda t, s: broken, 1, np.random.default_rng(0), steps=1)


def test_levels_that_reveal_nothing_call_no_denoiser_and_each_token_reads_its_own_levels_logits():
    """The denoiser runs only at levels where some token is revealed, and every token takes its x0
    from the call at its own reveal level: the logits encode the level (argmax bin = level mod the
    attribute's ids), temperature 0, and the reveal schedule is replayed from the same seed (at
    temperature 0 the reveal uniforms are the generator's only draws)."""
    from posterrt.runtime.schedulers.plannet import plannet_levels

    config = _config(num_timesteps=40, max_elements=3)
    sampler = PlanNetSampler(config)
    ids = np.array([config.pad_class + 1] + [config.num_bins] * 4)  # valid ids per attribute
    calls = []

    def denoise(tokens, timestep):
        calls.append(float(timestep[0]))
        logits = np.zeros((len(tokens), config.max_elements, 5, config.num_bins), np.float32)
        for attribute in range(5):
            logits[:, :, attribute, int(timestep[0]) % ids[attribute]] = 1.0
        return logits

    seed, steps = int(np.random.default_rng().integers(1 << 30)), 40
    tokens = sampler.sample(denoise, 1, np.random.default_rng(seed), steps=steps, temperature=0)
    levels = plannet_levels(config.num_timesteps, steps)
    free = np.arange(config.max_elements * 5)
    schedule = sampler._reveal_schedule(free, levels, np.random.default_rng(seed))
    revealing = [step for step in range(steps) if schedule[step].size]
    assert calls == [float(levels[step]) for step in revealing]
    assert len(calls) < steps, "some level reveals nothing here (15 tokens over 40 levels)"
    flat = tokens.reshape(-1)
    for step in revealing:
        for position in schedule[step]:
            assert flat[position] == int(levels[step]) % ids[position % 5], (step, position)
