"""The quality gate: a variant of a served model (optimized graph, int8, ...) against the bundle's
fp32 original, on a fixed set of seeded inputs, with stated tolerances.

What it measures, for a UNet-class step model (``bg_unet``, ``render_unet``):

* **noise prediction error per step**: the fp32 model runs a short guided DDIM loop (the bundle's
  scheduler config, classifier-free guidance batched as uncond + cond); at every step the variant
  gets the *same* input the reference got, so this error is the variant's own, not accumulated
  drift. Reported as relative RMS (``rms(variant - ref) / rms(ref)``) and max relative error
  (``max |variant - ref| / max |ref|``, the export parity figure);
* **latent PSNR**: the variant runs the whole loop on its own from the same noise; its final latent
  against the reference's, peak = the reference latent's range. This is what the sampler's
  feedback does to the per-step error;
* **image PSNR**: both final latents decoded by the bundle's fp32 ``vae_decoder`` (when the bundle
  has one), RGB in 0..1, peak 1: what a user would see.

A UNet's two feature-cache graphs (DeepCache: the deep step, the shallow step that takes the deep
feature) are judged as a pair (:func:`run_cached_gate`): each step by the figures above, the shallow
one fed the deep feature the fp32 deep step computes from the same step inputs, and then the cached
loop itself (the deep step every N steps, :func:`gate_cache_interval`, the shallow step on its kept
feature between) against the fp32 cached loop, by the same figures and tolerances.

Other models get the per-output errors on seeded random inputs (the layout-level checks for RADM
and PlanNet variants, boxes and layout metrics, are not written yet: no such variant exists).

Everything is seeded (the inputs, the initial noise, DDIM with eta = 0), so the same variant gets
the same report on every run. The calibration inputs of static quantization come from the same
generator with other seeds (:data:`CALIBRATION_SEED`), so a variant is never judged on the inputs
it was calibrated on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import DEEP_FEATURE, ModelContract
from posterrt.runtime.errors import ParityError
from posterrt.runtime.families import cached_step_of, cached_steps, unet_families
from posterrt.runtime.samples import default_sizes, sample_inputs
from posterrt.runtime.schedulers import DDIMScheduler, batch_for_guidance, combine_guidance

#: Which family config (scheduler, guidance scale) drives each UNet-class step model.
UNET_FAMILY = {unet: family.config_key for unet, family in unet_families().items()}
GATE_SEEDS = (0,)  # requests the gate judges on
CALIBRATION_SEED = 1000  # first seed of the calibration requests (never a gate seed)
GATE_STEPS = 6  # DDIM steps of the gate's loop: early (noisy) to late (clean) timesteps
GATE_IMAGE_SIZE = 256  # 32x32 latent, as the baseline step
#: The feature-cache interval of the cached-loop check when the bundle records no default interval
#: (:func:`gate_cache_interval`): of the gate's 6 steps, 2 deep and 4 shallow.
GATE_CACHE_INTERVAL = 3
DEFAULT_GUIDANCE = 7.5
NOISE = "noise_pred"  # a UNet step's output


@dataclass(frozen=True)
class Tolerances:
    """Bounds a variant must meet; None leaves a figure reported but not gated."""

    noise_max_rel: float | None = None
    noise_rel_rms: float | None = None
    latent_psnr_db: float | None = None
    image_psnr_db: float | None = None


#: A variant that claims fp32 results (fused / re-ordered graph): the export parity bound, 1e-4
#: of the output's scale (fp32 reassociation in fused kernels stays near 1e-6).
EXACT = Tolerances(noise_max_rel=1e-4)
#: Reduced precision (int8). What matters is the picture after the loop: 30 dB image PSNR is where
#: an fp16 / int8 SD image is commonly judged indistinguishable from its fp32 twin at the same
#: seed; the latent bound is 5 dB lower because the latent's peak (its range) is smaller relative
#: to its errors than an image's (0..1). The per-step bound is a coarse guard against a variant
#: that is wrong yet lucky in the loop: measured int8 errors are 0.05 (paper bg_unet, tiny bg_unet)
#: to 0.12 (tiny render_unet, at the last, least influential step, with a 38.7 dB image).
APPROXIMATE = Tolerances(noise_rel_rms=0.15, latent_psnr_db=25.0, image_psnr_db=30.0)


# ---------------------------------------------------------------------------------------------
# Representative inputs
# ---------------------------------------------------------------------------------------------
def is_unet_step(contract: ModelContract) -> bool:
    names = set(contract.input_names)
    return {"sample", "timestep", "encoder_hidden_states"} <= names and contract.output_names == [NOISE]


def gate_sizes(image_size: int = GATE_IMAGE_SIZE) -> dict[str, int]:
    sizes = default_sizes("opt")
    sizes.update(height=image_size, width=image_size, batch=1, cfg_batch=1)
    return sizes


@dataclass
class Request:
    """One guided generation: what stays fixed across steps, the initial noise, the guidance."""

    unconditional: dict  # step-invariant inputs of the uncond half (one row each)
    conditional: dict  # and of the cond half
    noise: np.ndarray  # initial latent [1, C, h, w]
    guidance_scale: float


def make_request(contract: ModelContract, seed: int, sizes: Mapping[str, int], guidance_scale: float) -> Request:
    """A request shaped like real use: two text embeddings, a rectangular product in the mask, a
    short category span, unit adapter scales. Two rows of ``sample_inputs`` give uncond and cond."""
    rows = sample_inputs(contract, {**sizes, "cfg_batch": 2}, seed)
    rng = np.random.default_rng(seed + 7919)
    shape = rows["sample"].shape[1:]
    if "mask" in rows:  # bg_unet: 1 = background to paint, one product rectangle
        height, width = shape[1:]
        mask = np.ones((1, 1, height, width), np.float32)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[..., top:top + height // 2, left:left + width // 2] = 0
        rows["mask"] = np.concatenate([mask, mask])
        rows["masked_image_latents"] = np.concatenate([rows["masked_image_latents"][:1]] * 2) * mask
    if "category_token_mask" in rows:
        category = np.zeros_like(rows["category_token_mask"][:1])
        category[:, 5:7] = 1  # "a product photo of <category> ..." puts it after a few tokens
        rows["category_token_mask"] = np.concatenate([category, category])
    for name in ("ip_scale", "control_scale"):
        if name in rows:
            rows[name] = np.ones_like(rows[name])
    # only the text condition differs between the halves; everything else is the same request
    step_inputs = {k: v for k, v in rows.items() if k not in ("sample", "timestep")}
    unconditional = {k: v[:1] for k, v in step_inputs.items()}
    conditional = {k: (v[1:] if k == "encoder_hidden_states" else v[:1]) for k, v in step_inputs.items()}
    noise = np.random.default_rng(seed + 104729).standard_normal((1, *shape)).astype(np.float32)
    return Request(unconditional, conditional, noise, guidance_scale)


def unet_settings(bundle: Bundle, model: str) -> tuple[dict, float]:
    """(scheduler config, guidance scale) of the model's family, as recorded at export."""
    family = bundle.config.get(UNET_FAMILY.get(model, ""), {})
    return dict(family.get("scheduler", {})), float(family.get("guidance_scale", DEFAULT_GUIDANCE))


StepFn = Callable[[dict], np.ndarray]
#: one call of a graph: inputs -> every output of its contract by name
OutputsFn = Callable[[dict], dict]


def denoise(step: StepFn, request: Request, scheduler_config: Mapping, steps: int,
            observer: Callable[[dict, np.ndarray], None] | None = None) -> np.ndarray:
    """Guided DDIM (eta = 0, deterministic) from ``request.noise``; returns the final latent.
    ``observer(inputs, output)`` sees every step's model inputs and raw output."""
    scheduler = DDIMScheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    invariant = batch_for_guidance(request.guidance_scale, paired={
        name: (request.unconditional[name], request.conditional[name]) for name in request.conditional})
    latent = (request.noise * scheduler.init_noise_sigma).astype(np.float32)
    for timestep in scheduler.timesteps:
        per_step = batch_for_guidance(request.guidance_scale, shared={
            "sample": scheduler.scale_model_input(latent, timestep), "timestep": np.full((1,), timestep, np.float32)})
        inputs = {**invariant, **per_step}
        output = step(inputs)
        if observer is not None:
            observer(inputs, output)
        latent = scheduler.step(combine_guidance(output, request.guidance_scale), timestep, latent)
    return latent


def calibration_inputs(reference: StepFn, bundle: Bundle, model: str, requests: int = 2,
                       steps: int = GATE_STEPS, image_size: int = GATE_IMAGE_SIZE) -> list[dict]:
    """Step inputs the fp32 model actually sees along its own loops (seeds CALIBRATION_SEED...):
    the activations static quantization calibrates on span early, noisy steps to late, clean ones."""
    contract = bundle.contract(model)
    scheduler_config, guidance = unet_settings(bundle, model)
    collected: list[dict] = []
    for index in range(requests):
        request = make_request(contract, CALIBRATION_SEED + index, gate_sizes(image_size), guidance)
        denoise(reference, request, scheduler_config, steps, lambda inputs, _: collected.append(inputs))
    return collected


def cached_step_calibration(bundle: Bundle, model: str, requests: int = 2, steps: int = GATE_STEPS,
                            image_size: int = GATE_IMAGE_SIZE) -> list[dict]:
    """Calibration inputs of a UNet's cached step ``model``: the step inputs along the fp32 deep step's
    own loops (those of :func:`calibration_inputs`); the shallow step's carry the deep feature the fp32
    deep step computed from the same inputs, as the cached loop feeds it."""
    unet = cached_step_of(model)
    deep_name, shallow_name = cached_steps(unet)
    deep = ort_outputs(bundle.model_path(deep_name), bundle.contract(deep_name))
    collected: list[dict] = []

    def step(inputs: dict) -> np.ndarray:
        outputs = deep(inputs)
        collected.append({**inputs, DEEP_FEATURE.name: outputs[DEEP_FEATURE.name]} if model == shallow_name else inputs)
        return outputs[NOISE]

    calibration_inputs(step, bundle, unet, requests, steps, image_size)
    return collected


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def relative_errors(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    diff = actual.astype(np.float64) - expected.astype(np.float64)
    expected = expected.astype(np.float64)
    return {"max_rel": float(np.abs(diff).max() / max(np.abs(expected).max(), 1e-12)),
            "rel_rms": float(np.sqrt(np.mean(diff ** 2)) / max(np.sqrt(np.mean(expected ** 2)), 1e-12))}


def psnr_db(actual: np.ndarray, expected: np.ndarray, peak: float) -> float:
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 20 * math.log10(peak) - 10 * math.log10(mse)


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------
def ort_step(path: Path, contract: ModelContract, threads: int | None = None) -> StepFn:
    """A step function over one ONNX file (see :func:`ort_outputs`): its output, or the list of its
    outputs when the contract has several."""
    run, names = ort_outputs(path, contract, threads), contract.output_names
    return lambda inputs: run(inputs)[names[0]] if len(names) == 1 else list(run(inputs).values())


def ort_outputs(path: Path, contract: ModelContract, threads: int | None = None) -> OutputsFn:
    """A call of one ONNX file (CPU execution provider, default graph optimizations), or of an OpenVINO
    IR variant (OpenVINO, at the precision the IR was written for): every output by name."""
    import onnxruntime as ort

    from posterrt.runtime.backends.openvino import OpenVinoSession, is_openvino_ir

    if is_openvino_ir(path):
        session = OpenVinoSession(path, threads)
    else:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = contract.output_names
    return lambda inputs: dict(zip(names, session.run(names, inputs)))


def evaluate(bundle: Bundle, model: str, variant: StepFn, reference: StepFn | None = None,
             steps: int = GATE_STEPS, image_size: int = GATE_IMAGE_SIZE, seeds=GATE_SEEDS) -> dict:
    """Every figure of the gate for ``variant`` (no pass/fail: see :func:`judge`)."""
    contract = bundle.contract(model)
    reference = reference or ort_step(bundle.model_path(model), contract)
    if not is_unet_step(contract):
        return _evaluate_generic(contract, variant, reference, seeds)
    scheduler_config, guidance = unet_settings(bundle, model)
    decoder = ort_step(bundle.model_path("vae_decoder"), bundle.contract("vae_decoder")) \
        if "vae_decoder" in bundle.models else None
    figures = {"steps": [], "requests": []}
    for seed in seeds:
        request = make_request(contract, seed, gate_sizes(image_size), guidance)

        def compare(inputs, expected):
            errors = relative_errors(variant(inputs), expected)
            figures["steps"].append({"seed": seed, "timestep": float(inputs["timestep"][0]), **errors})

        reference_latent = denoise(reference, request, scheduler_config, steps, compare)
        variant_latent = denoise(variant, request, scheduler_config, steps)
        peak = float(reference_latent.max() - reference_latent.min())
        entry = {"seed": seed, "latent_psnr_db": psnr_db(variant_latent, reference_latent, peak)}
        if decoder is not None:
            images = [decoder({"latent": latent}) for latent in (reference_latent, variant_latent)]
            entry["image_psnr_db"] = psnr_db(images[1], images[0], 1.0)
        figures["requests"].append(entry)
    figures["noise_max_rel"] = max(s["max_rel"] for s in figures["steps"])
    figures["noise_rel_rms"] = max(s["rel_rms"] for s in figures["steps"])
    figures["latent_psnr_db"] = min(r["latent_psnr_db"] for r in figures["requests"])
    if decoder is not None:
        figures["image_psnr_db"] = min(r["image_psnr_db"] for r in figures["requests"])
    figures.update(image_size=image_size, loop_steps=steps, guidance_scale=guidance, seeds=list(seeds))
    return figures


def _evaluate_generic(contract: ModelContract, variant: StepFn, reference: StepFn, seeds) -> dict:
    steps = []
    for seed in seeds:
        inputs = sample_inputs(contract, default_sizes("opt"), seed)
        expected, actual = reference(inputs), variant(inputs)
        pairs = zip(actual, expected) if isinstance(expected, list) else [(actual, expected)]
        steps.extend({"seed": seed, **relative_errors(a, e)} for a, e in pairs)
    return {"steps": steps, "requests": [], "seeds": list(seeds),
            "noise_max_rel": max(s["max_rel"] for s in steps), "noise_rel_rms": max(s["rel_rms"] for s in steps)}


def judge(figures: dict, tolerances: Tolerances) -> list[str]:
    """The failed checks, each saying by how much; empty when the variant passes."""
    failures = []
    for name, label in (("noise_max_rel", "noise prediction max relative error"),
                        ("noise_rel_rms", "noise prediction relative RMS error")):
        bound, value = getattr(tolerances, name), figures.get(name)
        if bound is not None and value is not None and not value <= bound:
            failures.append(f"{label} {value:.3g} > {bound:.3g} ({value / bound:.1f}x the tolerance)")
    for name, label in (("latent_psnr_db", "latent PSNR"), ("image_psnr_db", "image PSNR")):
        bound, value = getattr(tolerances, name), figures.get(name)
        if bound is not None and value is not None and not value >= bound:
            failures.append(f"{label} {value:.1f} dB < {bound:.1f} dB ({bound - value:.1f} dB short)")
    return failures


def run_gate(bundle: Bundle, model: str, variant_path: Path, tolerances: Tolerances, **options) -> dict:
    """The gate's report for the ONNX file (or OpenVINO IR) ``variant_path``: figures, tolerances, failures, passed."""
    variant = ort_step(variant_path, bundle.contract(model))
    return _report(evaluate(bundle, model, variant, **options), tolerances)


def _report(figures: dict, tolerances: Tolerances) -> dict:
    failures = judge(figures, tolerances)
    return {"tolerances": asdict(tolerances), "figures": figures, "failures": failures, "passed": not failures}


# ---------------------------------------------------------------------------------------------
# A UNet's feature-cache pair
# ---------------------------------------------------------------------------------------------
def noise_of(run: OutputsFn) -> StepFn:
    return lambda inputs: run(inputs)[NOISE]


def fed_deep_feature(shallow: OutputsFn, deep: OutputsFn) -> StepFn:
    """The shallow step as a plain step: fed the deep feature ``deep`` computes from the same inputs."""
    return lambda inputs: shallow({**inputs, DEEP_FEATURE.name: deep(inputs)[DEEP_FEATURE.name]})[NOISE]


def cached_loop(deep: OutputsFn, shallow: OutputsFn, deep_timesteps: set[float]) -> StepFn:
    """DeepCache's alternation as one step function: at ``deep_timesteps`` the deep step, whose feature
    it keeps; at the other timesteps the shallow step on the kept feature. Keyed by timestep, not by
    call count, so the same function serves :func:`evaluate`'s per-step comparison (called on the
    reference loop's inputs) and then its own loop."""
    kept: dict[str, np.ndarray] = {}

    def step(inputs: dict) -> np.ndarray:
        if float(inputs["timestep"][0]) in deep_timesteps:
            outputs = deep(inputs)
            kept[DEEP_FEATURE.name] = outputs[DEEP_FEATURE.name]
            return outputs[NOISE]
        return shallow({**inputs, **kept})[NOISE]

    return step


def deep_timesteps(scheduler_config: Mapping, steps: int, interval: int) -> set[float]:
    """The timesteps of :func:`denoise`'s loop that run the deep step: every ``interval``-th from the
    first, as the pipelines' feature cache does (runtime/pipelines/diffusion.py, ``UNetSteps``)."""
    scheduler = DDIMScheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    return {float(np.float32(t)) for t in scheduler.timesteps[::interval]}


def gate_cache_interval(bundle: Bundle, unet: str) -> int:
    """The interval the cached loop of ``unet``'s variants is judged at: the one its requests run by
    default (``engines cache-interval`` records it in the family config), else :data:`GATE_CACHE_INTERVAL`."""
    recorded = int(bundle.config.get(UNET_FAMILY[unet], {}).get("cache_interval", 1))
    return recorded if recorded > 1 else GATE_CACHE_INTERVAL


def run_cached_gate(bundle: Bundle, unet: str, files: Mapping[str, Path], tolerances: Tolerances,
                    interval: int = GATE_CACHE_INTERVAL, steps: int = GATE_STEPS, **options) -> dict[str, dict]:
    """The gate's reports for variant files of ``unet``'s cached steps (``files``: {deep step: file,
    shallow step: file}), keyed by step name, plus ``"cached_loop"``: the two variants alternating at
    ``interval`` against the fp32 pair alternating the same way. The shallow step alone is judged fed
    the fp32 deep step's feature of the same inputs, on both sides."""
    deep_name, shallow_name = cached_steps(unet)
    fp32 = {name: ort_outputs(bundle.model_path(name), bundle.contract(name)) for name in (deep_name, shallow_name)}
    variant = {name: ort_outputs(files[name], bundle.contract(name)) for name in (deep_name, shallow_name)}
    at_deep = deep_timesteps(unet_settings(bundle, unet)[0], steps, interval)
    pairs = {
        deep_name: noise_of(variant[deep_name]),
        shallow_name: fed_deep_feature(variant[shallow_name], fp32[deep_name]),
        "cached_loop": cached_loop(variant[deep_name], variant[shallow_name], at_deep),
    }
    references = {
        deep_name: noise_of(fp32[deep_name]),
        shallow_name: fed_deep_feature(fp32[shallow_name], fp32[deep_name]),
        "cached_loop": cached_loop(fp32[deep_name], fp32[shallow_name], at_deep),
    }
    reports = {what: _report(evaluate(bundle, unet, pairs[what], references[what], steps=steps, **options), tolerances)
               for what in pairs}
    reports["cached_loop"]["figures"]["cache_interval"] = interval
    return reports


def require_pass(report: dict, what: str) -> None:
    """Raise ParityError naming every failed check when the gate did not pass."""
    if not report["passed"]:
        raise ParityError(f"{what}: quality gate failed: " + "; ".join(report["failures"]))
