"""The layout samplers: RADM's box DDIM + post-processing, PlanNet's absorbing discrete diffusion.

The denoisers here are fakes with known answers; the samplers only ever see a callable.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from posterrt.runtime.errors import BundleError, ContractError, InputError
from posterrt.runtime.schedulers.boxes import batched_nms, cxcywh_to_xyxy, xyxy_to_cxcywh
from posterrt.runtime.schedulers.plannet import (PlanNetSampler, PlanNetSamplerConfig, dequantize_ltwh,
                                                 plannet_levels)
from posterrt.runtime.schedulers.radm import (RadmBoxSampler, RadmSamplerConfig, cosine_alphas_cumprod,
                                              ddim_time_pairs, diffusion_to_pixel, image_whwh,
                                              pixel_to_diffusion, postprocess)

RADM_CLASSES = ("logo", "text", "underlay", "embellishment")
PLAN_CLASSES = ("product", "logo", "text", "underlay", "embellishment")


# ---------------------------------------------------------------------------------------------
# RADM
# ---------------------------------------------------------------------------------------------
def test_cosine_schedule_follows_its_definition():
    # Nichol & Dhariwal's cosine schedule as DiffusionDet defines it, from scratch in plain floats:
    # f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), alpha_bar(t) = f(t) / f(0),
    # beta_t = clip(1 - alpha_bar(t + 1) / alpha_bar(t), 0, 0.999), alphas_cumprod = prod (1 - beta).
    T, s = 1000, 0.008

    def f(t):
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    expected, product = [], 1.0
    for t in range(T):
        beta = min(max(1 - (f(t + 1) / f(0)) / (f(t) / f(0)), 0.0), 0.999)
        product *= 1 - beta
        expected.append(product)
    np.testing.assert_allclose(cosine_alphas_cumprod(T), expected, rtol=1e-12)
    # before the clip bites, the product telescopes to alpha_bar(t + 1)
    assert cosine_alphas_cumprod(T)[500] == pytest.approx(f(501) / f(0), rel=1e-12)


def test_time_pairs_are_diffusiondets():
    assert ddim_time_pairs(1000, 1) == [(999, -1)]
    assert ddim_time_pairs(1000, 4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    assert ddim_time_pairs(1000, 3) == [(999, 665), (665, 332), (332, -1)]


def test_box_transforms_round_trip_and_known_values():
    rng = np.random.default_rng(0)
    sizes = np.array([[512, 768], [640, 320]], dtype=np.float32)  # (height, width)
    whwh = image_whwh(sizes)
    np.testing.assert_array_equal(whwh[0], [768, 512, 768, 512])
    np.testing.assert_array_equal(image_whwh(sizes, swapped=True)[0], [512, 768, 512, 768])

    x = rng.uniform(-2.5, 2.5, size=(2, 50, 4)).astype(np.float32)  # beyond the scale too: clamped
    back = pixel_to_diffusion(diffusion_to_pixel(x, whwh, 2.0), whwh, 2.0)
    np.testing.assert_allclose(back, np.clip(x, -2, 2), atol=2e-5)
    # x = 0 is the centred box of half the image
    centre = diffusion_to_pixel(np.zeros((2, 1, 4), np.float32), whwh, 2.0)
    np.testing.assert_allclose(centre[0, 0], [192, 128, 576, 384])
    xyxy = rng.uniform(0, 100, size=(30, 4))
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-9)


def _iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def _brute_force_nms(boxes, scores, labels, threshold):
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(labels[j] != labels[i] or _iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed,threshold", [(0, 0.15), (1, 0.5), (2, 0.0), (3, 0.7)])
def test_nms_matches_brute_force(seed, threshold):
    rng = np.random.default_rng(seed)
    # 20 base boxes, each seen 4 times with a few pixels of jitter: overlaps at every IoU level
    corners = np.repeat(rng.uniform(0, 100, size=(20, 2)), 4, axis=0) + rng.uniform(-4, 4, size=(80, 2))
    boxes = np.concatenate([corners, corners + np.repeat(rng.uniform(5, 40, size=(20, 2)), 4, axis=0)], axis=1)
    scores = rng.random(80)
    labels = rng.integers(0, 3, size=80)
    keep = batched_nms(boxes, scores, labels, threshold)
    assert keep.tolist() == _brute_force_nms(boxes, scores, labels, threshold)
    assert 0 < len(keep) < 80  # the case is not trivial
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).tolist() == []


def _logit(p):
    return math.log(p / (1 - p))


def test_postprocess_top_k_threshold_nms_and_clipping():
    boxes = np.array([[0, 0, 10, 10],      # proposal 0: confident logo
                      [1, 1, 10, 10],      # proposal 1: same place, weaker logo -> suppressed (IoU 0.81)
                      [50, 50, 90, 90],    # proposal 2: text 0.9 and underlay 0.8, both kept (class-wise)
                      [200, 0, 260, 40],   # proposal 3: spills over the right edge -> clipped to 240
                      [100, 100, 120, 120]], np.float32)  # proposal 4: everything below the threshold
    probabilities = np.full((5, 4), 0.01)
    probabilities[0, 0], probabilities[1, 0] = 0.95, 0.6
    probabilities[2, 1], probabilities[2, 2] = 0.9, 0.8
    probabilities[3, 3] = 0.7
    probabilities[4, 1] = 0.2
    logits = np.vectorize(_logit)(probabilities).astype(np.float32)
    image_size = (200, 240)  # height, width

    result = postprocess(logits, boxes, image_size, top_k=100, nms_iou=0.15, score_threshold=0.25)
    assert result.labels.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(result.scores, [0.95, 0.9, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(result.boxes, [[0, 0, 10, 10], [50, 50, 90, 90], [50, 50, 90, 90],
                                                 [200, 0, 240, 40]])
    assert result.boxes.dtype == np.float32 and result.labels.dtype == np.int64

    # top_k bounds the candidates before NMS: the best two pairs only
    assert postprocess(logits, boxes, image_size, 2, 0.15, 0.25).labels.tolist() == [0, 1]
    # a higher threshold keeps fewer
    assert postprocess(logits, boxes, image_size, 100, 0.15, 0.85).scores.tolist() == pytest.approx([0.95, 0.9])
    # looser NMS lets the overlapping weaker logo through
    assert len(postprocess(logits, boxes, image_size, 100, 0.9, 0.25)) == 5
    # a box entirely outside the image is empty after clipping and dropped
    outside = boxes.copy()
    outside[3] = [300, 0, 320, 40]
    assert 3 not in postprocess(logits, outside, image_size, 100, 0.15, 0.25).labels.tolist()


def _radm_config(**overrides):
    return RadmSamplerConfig.from_bundle_config({"class_names": list(RADM_CLASSES), "num_classes": 4, **overrides})


class FixedBoxesHead:
    """A fake radm_head: proposals 0..2 predict known boxes with confident classes, the rest background."""

    boxes = np.array([[10, 20, 110, 60], [150, 300, 300, 380], [20, 400, 200, 500]], np.float32)
    labels = np.array([1, 0, 2])

    def __init__(self):
        self.calls = []

    def __call__(self, boxes, timestep):
        self.calls.append((boxes.copy(), timestep.copy()))
        batch, proposals, _ = boxes.shape
        logits = np.full((batch, proposals, 4), -6.0, np.float32)
        pred = boxes.copy()
        for i, (box, label) in enumerate(zip(self.boxes, self.labels)):
            logits[:, i, label] = 4.0
            pred[:, i] = box
        return logits, pred


def test_one_step_with_a_known_head_returns_its_boxes():
    head = FixedBoxesHead()
    sampler = RadmBoxSampler(_radm_config())
    sizes = [[512, 320], [640, 384]]  # (height, width)
    results = sampler.sample(head, sizes, np.random.default_rng(0))

    assert len(head.calls) == 1
    boxes, timestep = head.calls[0]
    assert boxes.shape == (2, 100, 4) and boxes.dtype == np.float32
    assert timestep.dtype == np.float32 and timestep.tolist() == [999, 999]
    # proposals are not clipped (as DiffusionDet): centres and sizes lie within the image
    centres_and_sizes = xyxy_to_cxcywh(boxes[0])
    assert (centres_and_sizes >= -1e-4).all() and (centres_and_sizes <= [320, 512, 320, 512]).all()
    for result in results:
        np.testing.assert_array_equal(result.boxes, FixedBoxesHead.boxes)
        assert result.labels.tolist() == FixedBoxesHead.labels.tolist()
        np.testing.assert_allclose(result.scores, 1 / (1 + math.exp(-4.0)), rtol=1e-6)


def test_sampling_is_deterministic_for_a_seed():
    def head(boxes, timestep):  # depends on its input, so the noise matters
        logits = np.stack([boxes[..., 0] / 100 - 2, boxes[..., 1] / 100 - 2, -boxes[..., 2] / 200,
                           boxes[..., 3] / 300 - 1], axis=-1).astype(np.float32)
        return logits, boxes + 3.0

    sampler = RadmBoxSampler(_radm_config(sampling_steps=3))
    first = sampler.sample(head, [[256, 256]], np.random.default_rng(7))[0]
    again = sampler.sample(head, [[256, 256]], np.random.default_rng(7))[0]
    other = sampler.sample(head, [[256, 256]], np.random.default_rng(8))[0]
    np.testing.assert_array_equal(first.boxes, again.boxes)
    np.testing.assert_array_equal(first.scores, again.scores)
    assert len(first) and not (len(first) == len(other) and np.array_equal(first.boxes, other.boxes))


def test_multi_step_ddim_update_box_renewal_and_ensemble():
    head = FixedBoxesHead()
    sampler = RadmBoxSampler(_radm_config(sampling_steps=2, ddim_eta=0.0))
    size = np.array([[512, 384]], np.float32)
    sampler.sample(head, size, np.random.default_rng(3))
    assert [c[1].tolist() for c in head.calls] == [[999.0], [499.0]]

    # Replay the first step by hand from the same generator stream: x_T, the step noise (unused at
    # eta = 0), then fresh noise for the 97 proposals the head scored as background.
    replay = np.random.default_rng(3)
    x_t = replay.standard_normal((1, 100, 4), dtype=np.float32)
    replay.standard_normal((1, 100, 4), dtype=np.float32)
    fresh = replay.standard_normal((97, 4), dtype=np.float32)
    whwh = image_whwh(size)
    x0 = pixel_to_diffusion(FixedBoxesHead.boxes[None], whwh, 2.0)
    alpha, alpha_next = cosine_alphas_cumprod(1000)[[999, 499]]
    eps = (x_t[:, :3] / math.sqrt(alpha) - x0) / math.sqrt(1 / alpha - 1)
    expected = x0 * math.sqrt(alpha_next) + math.sqrt(1 - alpha_next) * eps
    second_input = head.calls[1][0]
    np.testing.assert_allclose(second_input[:, :3], diffusion_to_pixel(expected, whwh, 2.0), rtol=1e-4, atol=1e-3)
    # proposals scored as background were renewed with fresh noise instead of being stepped
    np.testing.assert_allclose(second_input[0, 3:], diffusion_to_pixel(fresh[None], whwh, 2.0)[0], rtol=1e-6)

    # without renewal every proposal is stepped
    head = FixedBoxesHead()
    RadmBoxSampler(_radm_config(sampling_steps=2, ddim_eta=0.0, box_renewal=False)).sample(
        head, size, np.random.default_rng(3))
    x0_background = np.clip(x_t[:, 3:], -2, 2)  # the head echoes those proposals back as its x0
    eps = (x_t[:, 3:] / math.sqrt(alpha) - x0_background) / math.sqrt(1 / alpha - 1)
    stepped = x0_background * math.sqrt(alpha_next) + math.sqrt(1 - alpha_next) * eps
    np.testing.assert_allclose(head.calls[1][0][:, 3:], diffusion_to_pixel(stepped, whwh, 2.0), rtol=1e-4, atol=1e-3)

    # the ensemble pools every call: boxes predicted only at the last call still come out
    class MovingHead(FixedBoxesHead):
        def __call__(self, boxes, timestep):
            logits, pred = super().__call__(boxes, timestep)
            if len(self.calls) == 2:
                pred[:, 0] = [250, 20, 370, 60]  # proposal 0 moves at the last call
            return logits, pred

    results = RadmBoxSampler(_radm_config(sampling_steps=2)).sample(MovingHead(), size, np.random.default_rng(0))[0]
    assert [250, 20, 370, 60] in results.boxes.tolist() and [10, 20, 110, 60] in results.boxes.tolist()


def test_radm_config_and_input_errors():
    with pytest.raises(BundleError, match="radm.nms_iou: got 1.5"):
        _radm_config(nms_iou=1.5)
    with pytest.raises(BundleError, match="radm.num_classes: got 5"):
        RadmSamplerConfig.from_bundle_config({"class_names": list(RADM_CLASSES), "num_classes": 5})
    with pytest.raises(BundleError, match="radm.schedule"):
        _radm_config(schedule="linear")
    config = _radm_config(fpn_channels=256)  # model sizes in the same dict are ignored
    assert config.num_proposals == 100 and config.num_classes == 4
    sampler = RadmBoxSampler(config)
    with pytest.raises(InputError, match="image_sizes"):
        sampler.sample(FixedBoxesHead(), [512, 512], np.random.default_rng(0))
    with pytest.raises(InputError, match="steps: got 0"):
        sampler.sample(FixedBoxesHead(), [[512, 512]], np.random.default_rng(0), steps=0)
    with pytest.raises(ContractError, match="class_logits"):
        sampler.sample(lambda b, t: (np.zeros((1, 100, 3), np.float32), b), [[512, 512]], np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# PlanNet
# ---------------------------------------------------------------------------------------------
def _plan_config(**overrides):
    return PlanNetSamplerConfig.from_bundle_config({"class_names": list(PLAN_CLASSES), "pad_class": 5,
                                                    "num_bins": 16, "mask_token": 16, "vocab_size": 17,
                                                    "num_timesteps": 20, "max_elements": 6, **overrides})


def _target_tokens(config, batch):
    rng = np.random.default_rng(42)
    tokens = rng.integers(0, config.num_bins, size=(batch, config.max_elements, 5))
    tokens[..., 0] = rng.integers(0, config.pad_class + 1, size=(batch, config.max_elements))
    tokens[:, -1, 0] = config.pad_class  # at least one "no element"
    tokens[:, 0, 0] = 0
    return tokens


class CertainModel:
    """Predicts a fixed layout with certainty (one-hot logits), and records what it was shown."""

    def __init__(self, target, num_bins):
        self.logits = np.where(np.arange(num_bins) == target[..., None], 30.0, -30.0).astype(np.float32)
        self.calls = []

    def __call__(self, tokens, timestep):
        self.calls.append((tokens.copy(), timestep.copy()))
        return self.logits


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_certain_model_gives_its_layout(temperature):
    config = _plan_config(box_format="ltwh")
    target = _target_tokens(config, batch=3)
    model = CertainModel(target, config.num_bins)
    tokens = PlanNetSampler(config).sample(model, 3, np.random.default_rng(0), temperature=temperature)
    np.testing.assert_array_equal(tokens, target)
    assert [c[1][0] for c in model.calls] == list(range(20, 0, -1))
    assert model.calls[0][1].dtype == np.float32 and (model.calls[0][0] == config.mask_token).all()

    layouts = PlanNetSampler(config).decode(tokens, [[400, 800]] * 3)
    real = target[0, :, 0] < config.pad_class
    assert layouts[0].labels.tolist() == target[0, real, 0].tolist()
    left, top, width, height = ((target[0, real, 1:] + 0.5) / 16).T
    expected = np.clip(np.stack([left * 800, top * 400, (left + width) * 800, (top + height) * 400], -1),
                       0, [800, 400, 800, 400])
    np.testing.assert_allclose(layouts[0].boxes, expected, rtol=1e-6)


@pytest.mark.parametrize("steps", [20, 5])
def test_masked_fraction_follows_the_linear_schedule(steps):
    config = _plan_config(max_elements=25)
    shown = []

    def uniform_model(tokens, timestep):
        shown.append(((tokens == config.mask_token).mean(), float(timestep[0])))
        return np.zeros((len(tokens), 25, 5, config.num_bins), np.float32)

    batch = 40  # 40 x 25 x 5 = 5000 tokens: the binomial std of a fraction is <= 0.007
    PlanNetSampler(config).sample(uniform_model, batch, np.random.default_rng(123), steps=steps)
    assert len(shown) == steps
    for fraction, level in shown:
        assert fraction == pytest.approx(level / 20, abs=0.03), (level, fraction)  # > 4 sigma


def test_strided_levels_and_determinism():
    np.testing.assert_array_equal(plannet_levels(100, 4), [100, 75, 50, 25, 0])
    np.testing.assert_array_equal(plannet_levels(100, 100), np.arange(100, -1, -1))
    levels = plannet_levels(100, 37)
    assert len(np.unique(levels)) == 38 and (np.diff(levels) < 0).all()

    config = _plan_config()
    logits = np.random.default_rng(5).standard_normal((2, 6, 5, 16)).astype(np.float32)

    def model(tokens, timestep):
        return logits

    sampler = PlanNetSampler(config)
    first = sampler.sample(model, 2, np.random.default_rng(9), steps=7)
    np.testing.assert_array_equal(first, sampler.sample(model, 2, np.random.default_rng(9), steps=7))
    assert not np.array_equal(first, sampler.sample(model, 2, np.random.default_rng(10), steps=7))
    assert (first != config.mask_token).all() and (first[..., 0] <= config.pad_class).all()


def test_class_attribute_never_takes_an_invalid_id():
    config = _plan_config()
    favour_invalid = np.zeros((1, 6, 5, 16), np.float32)
    favour_invalid[:, :, 0, 10] = 50.0  # class id 10 > pad_class 5: masked out by the sampler
    tokens = PlanNetSampler(config).sample(lambda t, s: favour_invalid, 1, np.random.default_rng(0), temperature=0)
    assert (tokens[..., 0] <= config.pad_class).all()


def test_fixed_tokens_are_given_from_the_start_and_never_change():
    config = _plan_config()
    sampler = PlanNetSampler(config)
    target = _target_tokens(config, batch=2)
    model = CertainModel(target, config.num_bins)
    fixed = sampler.blank_tokens(2)
    fixed[:, 0, 0] = 0  # element 0 is the product
    fixed[:, 1, :] = [2, 1, 2, 3, 4]  # element 1 is a given text box, which the model disagrees with
    tokens = sampler.sample(model, 2, np.random.default_rng(0), steps=4, fixed_tokens=fixed)
    for shown, _ in model.calls:
        np.testing.assert_array_equal(shown[:, 0, 0], 0)
        np.testing.assert_array_equal(shown[:, 1], [[2, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(tokens[:, 1], [[2, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(tokens[:, 2:], target[:, 2:])

    with pytest.raises(InputError, match="fixed_tokens"):
        sampler.sample(model, 2, np.random.default_rng(0), fixed_tokens=fixed[:1])
    bad = fixed.copy()
    bad[0, 2, 0] = 9  # class id beyond pad_class
    with pytest.raises(InputError, match="fixed_tokens: values"):
        sampler.sample(model, 2, np.random.default_rng(0), fixed_tokens=bad)


def test_plannet_config_and_decode_details():
    with pytest.raises(BundleError, match="plannet.mask_token: got 128"):
        _plan_config(mask_token=128)
    with pytest.raises(BundleError, match="plannet.num_bins"):
        _plan_config(num_bins=4, mask_token=4, vocab_size=5)
    with pytest.raises(InputError, match="steps: got 21"):
        PlanNetSampler(_plan_config()).sample(lambda t, s: None, 1, np.random.default_rng(0), steps=21)
    with pytest.raises(ContractError, match="logits of shape"):
        PlanNetSampler(_plan_config()).sample(lambda t, s: np.zeros((1, 6, 5, 8)), 1, np.random.default_rng(0))
    np.testing.assert_allclose(dequantize_ltwh(np.array([0, 15, 0, 15]), 16, "ltwh"), [0.5 / 16, 15.5 / 16] * 2)
    # centre format: left = cx - w/2 = 0.5/16 - 7.75/16
    np.testing.assert_allclose(dequantize_ltwh(np.array([0, 1, 15, 15]), 16, "cxcywh"),
                               [-7.25 / 16, -6.25 / 16, 15.5 / 16, 15.5 / 16])
    with pytest.raises(BundleError, match="plannet.box_format"):
        _plan_config(box_format="xyxy")
    tokens = np.array([[[5, 1, 1, 1, 1], [1, 0, 0, 15, 15], [2, 8, 8, 15, 15]]])
    config = _plan_config(max_elements=3, box_format="ltwh")
    layout = PlanNetSampler(config).decode(tokens, [[160, 320]])[0]
    assert layout.labels.tolist() == [1, 2]  # the pad element is gone
    np.testing.assert_allclose(layout.boxes, [[10, 5, 320, 160], [170, 85, 320, 160]])  # second one clipped
    centred = PlanNetSampler(_plan_config(max_elements=3)).decode(tokens, [[160, 320]])[0]
    # x1 = (0.5 - 7.75)/16 * 320 < 0 -> 0; x2 = (0.5 + 7.75)/16 * 320 = 165; second: x1 = (8.5 - 7.75)/16 * 320 = 15
    np.testing.assert_allclose(centred.boxes, [[0, 0, 165, 82.5], [15, 7.5, 320, 160]])
