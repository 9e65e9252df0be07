"""PlanNet's sampler: absorbing-state (mask) discrete diffusion over layout tokens, LayoutDM-style.

A layout is ``max_elements`` elements of 5 tokens (class, x, y, w, h); box attributes are bins
0..K-1, the class is 0..len(class_names) where ``pad_class`` = len(class_names) means "no
element", and ``mask_token`` = K is the absorbing state. The forward process masks each token
independently with probability t/T (linear schedule), so sampling runs backwards from all-mask:

    at level t: the denoiser predicts x0 logits for every token; each still-masked token is
    revealed with probability 1 - t'/t, where t' is the next level, and a revealed token draws its
    x0 from softmax(logits / temperature) (the argmax at temperature 0); revealed tokens never
    change again.

That keeps the masked fraction at t/T in expectation at every level visited. Whether a token is
revealed never depends on the model, and the chained survival probabilities telescope
(P(masked at t') = t'/T), so each free token's reveal level is drawn up front from one uniform u
(still masked at level t' while u < t'/T): the same process, with no reveal work per step. Each
free token's Gumbel noise is drawn up front too (one draw per logit of a free token, as a draw at
its reveal step would take), so a step only reads the logits of the tokens it reveals and takes
their Gumbel-max: the loop runs 100 steps around a sub-millisecond denoiser.

``steps`` < T visits the levels ``round(linspace(T, 0, steps + 1))`` with the same reveal rule, so
a strided run is the same process observed at fewer levels. The denoiser is called at each level
visited where some token is revealed: the reveal levels are known before the loop, and a level
that reveals nothing would only compute logits that no draw reads (on the tiny bundle 29 of 100
levels; the tokens are the same either way). The denoiser's
``timestep`` is the level t (T at the all-mask start, 1 for the last call of a full run).

Conditioning: ``fixed_tokens`` holds given tokens (the product's class, a known box) and
``mask_token`` elsewhere; given tokens are in place from the start and never re-masked.

The sampler knows nothing of backends: ``denoise(tokens, timestep) -> logits`` closes over the
encoder's ``memory`` / ``memory_mask``. Randomness comes from one numpy ``Generator`` for the batch,
or one per row: row i then draws exactly what a batch-1 run with its generator draws, so plans
batched into one loop (the server-side loop) equal the plans run one by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import BundleError, ContractError, InputError

#: ``denoise(tokens [B, E, 5] int64, timestep [B] float32) -> logits [B, E, 5, K] float32``
TokenDenoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]

ATTRIBUTES = ("class", "x", "y", "w", "h")
BOX_FORMATS = ("cxcywh", "ltwh")


@dataclass(frozen=True)
class PlanNetSamplerConfig:
    """``config["plannet"]`` of a bundle manifest, sampler part."""

    class_names: tuple[str, ...]
    num_bins: int = 128
    num_timesteps: int = 100
    max_elements: int = 25
    #: what the (x, y, w, h) bins mean: "cxcywh" (box centre, PlanNet's export) or "ltwh" (left, top)
    box_format: str = "cxcywh"

    @property
    def pad_class(self) -> int:
        return len(self.class_names)

    @property
    def mask_token(self) -> int:
        return self.num_bins

    @property
    def vocab_size(self) -> int:
        return self.num_bins + 1

    @classmethod
    def from_bundle_config(cls, config: Mapping) -> "PlanNetSamplerConfig":
        """From ``bundle.config["plannet"]``; the derived ids it records must agree with ours."""
        names = config.get("class_names")
        if not isinstance(names, (list, tuple)) or not names:
            raise BundleError(f"bundle config plannet.class_names: got {names!r}, expected a non-empty list")
        keys = ("num_bins", "num_timesteps", "max_elements", "box_format")
        result = cls(tuple(names), **{k: config[k] for k in keys if k in config})
        for key in ("pad_class", "mask_token", "vocab_size"):
            if key in config and config[key] != getattr(result, key):
                raise BundleError(f"bundle config plannet.{key}: got {config[key]!r}, expected "
                                  f"{getattr(result, key)} for {len(names)} classes and {result.num_bins} bins")
        result.validate()
        return result

    def validate(self) -> None:
        for key in ("num_bins", "num_timesteps", "max_elements"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise BundleError(f"bundle config plannet.{key}: got {value!r}, expected an integer >= 1")
        if self.box_format not in BOX_FORMATS:
            raise BundleError(f"bundle config plannet.box_format: got {self.box_format!r}, expected one of {BOX_FORMATS}")
        if self.pad_class >= self.num_bins:
            raise BundleError(f"bundle config plannet.num_bins: got {self.num_bins}, expected more than "
                              f"{self.pad_class} so that every class and the pad class have a token")


@dataclass
class PlannedLayout:
    """One canvas's layout: ``boxes`` [n, 4] pixel x1y1x2y2 (float32, clipped), ``labels`` [n] int64
    indices into ``class_names``, ``tokens`` [E, 5] the raw sampled tokens."""

    boxes: np.ndarray
    labels: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def plannet_levels(num_timesteps: int, steps: int) -> np.ndarray:
    """Levels visited: T down to 0 in ``steps`` strides (distinct ints, since the stride is >= 1)."""
    return np.linspace(num_timesteps, 0, steps + 1).round().astype(np.int64)


def dequantize_ltwh(bins: np.ndarray, num_bins: int, box_format: str = "cxcywh") -> np.ndarray:
    """Box bins (x, y, w, h) -> normalized (left, top, width, height) in [0, 1], at bin centres
    (the inverse of the export's ``bin = min(floor(v * K), K - 1)``). ``box_format`` says whether
    x, y are the box centre (PlanNet's export records "cxcywh") or its top-left corner."""
    values = (bins.astype(np.float32) + 0.5) / num_bins
    if box_format == "cxcywh":
        values = values.copy()
        values[..., :2] -= values[..., 2:] / 2
    return values


def tokens_to_layout(tokens: np.ndarray, config: PlanNetSamplerConfig, canvas_size) -> PlannedLayout:
    """One canvas's tokens [E, 5] -> its elements; pad-class (and any unresolved) elements dropped."""
    classes, bins = tokens[:, 0], tokens[:, 1:]
    real = (classes < config.pad_class) & (tokens != config.mask_token).all(axis=1)
    left, top, width, height = np.moveaxis(dequantize_ltwh(bins[real], config.num_bins, config.box_format), -1, 0)
    canvas_h, canvas_w = float(canvas_size[0]), float(canvas_size[1])
    boxes = np.stack([left * canvas_w, top * canvas_h, (left + width) * canvas_w, (top + height) * canvas_h], axis=-1)
    limits = np.array([canvas_w, canvas_h, canvas_w, canvas_h], dtype=np.float32)
    return PlannedLayout(np.clip(boxes, 0, limits).astype(np.float32).reshape(-1, 4),
                         classes[real].astype(np.int64), tokens.copy())


class PlanNetSampler:
    """Absorbing-state discrete diffusion sampler. One instance per bundle; ``sample`` is reentrant."""

    def __init__(self, config: PlanNetSamplerConfig):
        config.validate()
        self.config = config
        # added to the logits per token position (E elements x class, x, y, w, h): the class has
        # pad_class + 1 valid ids. Per position rather than per attribute, so a step looks its
        # revealed tokens' rows up in one index instead of computing ``position % 5`` first.
        attribute_bias = np.zeros((5, config.num_bins))
        attribute_bias[0, config.pad_class + 1:] = -np.inf
        self._position_bias = np.tile(attribute_bias, (config.max_elements, 1))

    def blank_tokens(self, batch_size: int) -> np.ndarray:
        """All-mask tokens [B, E, 5]: fill some in and pass them as ``fixed_tokens`` to condition."""
        return np.full((batch_size, self.config.max_elements, 5), self.config.mask_token, dtype=np.int64)

    def sample(self, denoise: TokenDenoiser, batch_size: int,
               generator: np.random.Generator | Sequence[np.random.Generator],
               steps: int | None = None, temperature: float = 1.0,
               fixed_tokens: np.ndarray | None = None, on_step=None) -> np.ndarray:
        """Sampled tokens [B, E, 5] (int64, no mask left). ``steps`` defaults to T (one call per level
        that reveals a token: a level that reveals none would compute logits nobody reads).
        ``generator``: one for the whole batch (rows draw from it in turn), or a sequence of one per row.
        ``on_step(step, steps)``: called after each level, called or not (progress, cancellation)."""
        cfg = self.config
        steps = cfg.num_timesteps if steps is None else steps
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= cfg.num_timesteps:
            raise InputError(f"steps: got {steps!r}, expected an integer in 1..{cfg.num_timesteps}")
        if not np.isfinite(temperature) or temperature < 0:
            raise InputError(f"temperature: got {temperature!r}, expected a number >= 0 (0 = argmax)")
        rows = _row_generators(generator, batch_size)
        tokens = self.blank_tokens(batch_size) if fixed_tokens is None else self._checked_fixed(fixed_tokens, batch_size)
        flat = tokens.reshape(batch_size, -1)  # a view (tokens is C-contiguous): [B, E * 5], written in place

        levels = plannet_levels(cfg.num_timesteps, steps)
        # Every random number of the plan is drawn here, before the loop: each free token's reveal
        # level and its Gumbel noise. Per step only the revealed tokens' logits are read.
        schedules, noise = [], []
        for row, row_generator in enumerate(rows):
            free = np.flatnonzero(flat[row] == cfg.mask_token)
            schedules.append(self._reveal_schedule(free, levels, row_generator))
            noise.append(self._noisy_bias(free, temperature, row_generator))
        timesteps = np.repeat(levels[:-1, None], batch_size, axis=1).astype(np.float32)  # [steps, B], made once
        drawn = []  # the scores of every draw, checked once after the loop (_check_draws)
        for step in range(steps):
            revealing = [row for row in range(batch_size) if schedules[row][step].size]
            if revealing:  # a level that reveals no token: its logits would not be read, so no call
                logits = self._checked_logits(denoise(tokens.copy(), timesteps[step]))
                for row in revealing:
                    revealed = schedules[row][step]
                    scores = self._draw_scores(logits[row].reshape(flat.shape[1], cfg.num_bins), revealed, temperature,
                                               noise[row])
                    flat[row, revealed] = scores.argmax(axis=1)
                    drawn.append(scores)
            if on_step is not None:
                on_step(step + 1, steps)
        self._check_draws(drawn)
        assert not (tokens == cfg.mask_token).any(), "the last level (0) reveals every token"
        return tokens

    def decode(self, tokens: np.ndarray, canvas_sizes) -> list[PlannedLayout]:
        """Tokens [B, E, 5] -> one layout per canvas of ``canvas_sizes`` [B, 2] (height, width) pixels."""
        canvas_sizes = np.asarray(canvas_sizes, dtype=np.float32).reshape(-1, 2)
        if len(canvas_sizes) != len(tokens):
            raise InputError(f"canvas_sizes: got {len(canvas_sizes)} sizes for {len(tokens)} layouts")
        return [tokens_to_layout(t, self.config, size) for t, size in zip(tokens, canvas_sizes)]

    # ----------------------------------------------------------------------------------------
    def _checked_logits(self, logits) -> np.ndarray:
        cfg = self.config
        logits = np.asarray(logits)
        if logits.ndim != 4 or logits.shape[1:] != (cfg.max_elements, 5, cfg.num_bins):
            raise ContractError(f"plannet denoiser: returned logits of shape {logits.shape}, expected "
                                f"[batch, {cfg.max_elements}, 5, {cfg.num_bins}]")
        return logits

    def _reveal_schedule(self, free: np.ndarray, levels: np.ndarray, generator) -> list[np.ndarray]:
        """The tokens each step reveals, for one row's ``free`` token indices: one uniform u per token,
        still masked at level t' while u < t'/T, so P(masked at t') = t'/T as the stepwise rule gives."""
        uniforms = generator.random(free.size)
        reveal_step = (uniforms[:, None] < levels[1:] / self.config.num_timesteps).sum(axis=1)
        order = np.argsort(reveal_step, kind="stable")
        return np.split(free[order], np.searchsorted(reveal_step[order], np.arange(1, len(levels) - 1)))

    def _noisy_bias(self, free: np.ndarray, temperature: float, generator) -> np.ndarray:
        """What a draw adds to each token position's logits [E * 5, K]: the attribute's bias (-inf on
        the class's invalid ids) plus, above temperature 0, the Gumbel noise of each ``free`` token.
        Gumbel-max: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). All free
        tokens' noise comes from one call before the loop, the same count of draws as one call per
        step for the tokens it reveals: a small numpy call right after a model call runs on caches
        the model evicted (measured on the tiny bundle: a draw costs 10 us alone, 41 us in the loop)."""
        if temperature == 0:
            return self._position_bias
        noisy = self._position_bias.copy()
        noisy[free] += generator.gumbel(size=(free.size, self.config.num_bins))
        return noisy

    def _draw_scores(self, logits: np.ndarray, revealed: np.ndarray, temperature: float,
                     noisy_bias: np.ndarray) -> np.ndarray:
        """The scores whose argmax per row is the x0 of each ``revealed`` token of one row: from its
        logits [E * 5, K] (only those rows are read) and ``_noisy_bias``, a draw from
        softmax(logits / temperature), the argmax at 0."""
        scores = noisy_bias[revealed]  # float64, a copy; the class's invalid ids at -inf
        scores += logits[revealed] if temperature in (0, 1) else np.true_divide(logits[revealed], temperature,
                                                                                dtype=np.float64)
        return scores

    @staticmethod
    def _check_draws(drawn: list[np.ndarray]) -> None:
        """-inf is a logit of probability 0; a NaN, +inf or a row without a finite logit among the
        rows drawn from is an error. Checked once after the loop, over every draw's scores (the noise
        is finite, so it changes neither), rather than per step: a small reduction right after a
        model call costs ~12 us on caches the model evicted, 5% of a tiny 0.8 ms step. The sum of
        the rows' maxima is finite exactly when each is (NaN and infinities propagate; float64
        cannot overflow on float32 logits)."""
        if drawn and not math.isfinite(np.concatenate(drawn).max(axis=1).sum()):
            raise ContractError("plannet denoiser: returned NaN, +Inf or no finite logit for a token being revealed")

    def _checked_fixed(self, fixed_tokens: np.ndarray, batch_size: int) -> np.ndarray:
        cfg = self.config
        fixed = np.asarray(fixed_tokens)
        if fixed.shape != (batch_size, cfg.max_elements, 5) or fixed.dtype.kind not in "iu":
            raise InputError(f"fixed_tokens: got {fixed.dtype} {fixed.shape}, expected int64 "
                             f"[{batch_size}, {cfg.max_elements}, 5] with mask_token={cfg.mask_token} where free")
        given = fixed != cfg.mask_token
        limits = np.array([cfg.pad_class + 1] + [cfg.num_bins] * 4)
        if ((fixed < 0) | (given & (fixed >= limits))).any():
            raise InputError(f"fixed_tokens: values must be class ids 0..{cfg.pad_class} and box bins "
                             f"0..{cfg.num_bins - 1} (or mask_token={cfg.mask_token}), got {fixed.min()}..{fixed.max()}")
        return np.array(fixed, dtype=np.int64, order="C")  # a C-ordered copy: the sampler writes it in place


def _row_generators(generator, batch_size: int) -> list:
    """One generator per row: ``generator`` itself for every row, or the sequence given."""
    if hasattr(generator, "random"):
        return [generator] * batch_size
    rows = list(generator)
    if len(rows) != batch_size:
        raise InputError(f"generator: got {len(rows)} generators for {batch_size} rows, expected one per row "
                         f"(or a single numpy Generator)")
    return rows
