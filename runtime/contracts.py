"""The I/O contract of every served model: the one place where a tensor's name, dtype and shape live.

Export names ONNX inputs/outputs and dynamic axes from here; the Triton repository builder, the
TensorRT optimization profiles and the client's checks read the same objects. Nothing else types a
tensor name by hand: code refers to ``CONTRACTS["bg_unet"].inputs[...]`` or to the constants below.

Shapes are tuples of dimension *symbols*:

* an ``int`` is a fixed size;
* a name in :data:`DYNAMIC_DIMS` (``batch``, ``height``, ``lines``, ...) is a dynamic axis with a
  min/opt/max range (the range feeds TensorRT profiles and request validation);
* ``"height/4"`` or ``"batch*2"`` is derived from a dynamic axis (FPN levels, latents);
* any other name (``fpn_channels``, ``text_dim``, ...) is a *static* size fixed by the exported
  checkpoint's config; a bundle's manifest records its value, and :meth:`ModelContract.resolve`
  substitutes it.

The first axis of every tensor is the model's batch axis, so Triton can batch requests.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import ContractError

#: Bumped whenever a name, dtype or shape below changes; bundles record it and the runtime
#: refuses a bundle exported for another version.
CONTRACT_VERSION = 1

PROLOGUE = "prologue"  # runs once per request, before the sampling loop
STEP = "step"  # runs once per denoising step
EPILOGUE = "epilogue"  # runs once per request, after the loop
ROLES = (PROLOGUE, STEP, EPILOGUE)

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


@dataclass(frozen=True)
class DimRange:
    """Range of one dynamic axis. ``multiple_of`` is enforced on request sizes."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dimension range must satisfy 1 <= min <= opt <= max, got {self}")


#: Dynamic axes shared by all models. Pixel sizes are multiples of 64 so that every stage
#: (FPN stride 32, VAE factor 8, UNet downsampling 8) divides them.
DYNAMIC_DIMS: dict[str, DimRange] = {
    "batch": DimRange(1, 1, 4),
    # UNet-class models run classifier-free guidance as one batch (uncond + cond).
    "cfg_batch": DimRange(1, 2, 8),
    "height": DimRange(256, 512, 1024, 64),
    "width": DimRange(256, 512, 1024, 64),
    # one row per poster text line (RADM's text encoder batches lines, not posters)
    "text_rows": DimRange(1, 4, 80),
    "lines": DimRange(1, 4, 20),
    "text_tokens": DimRange(4, 16, 64),
    "proposals": DimRange(1, 100, 300),
    "memory_tokens": DimRange(2, 69, 330),
    # boxes a server-side layout returns per row, padded to at least one (radm_layout's ``count``)
    "detections": DimRange(1, 100, 3000),
}


def _parse_symbol(symbol):
    """Split ``'height/4'`` into ('height', '/', 4); plain names give (name, None, 1)."""
    if isinstance(symbol, int):
        return None, None, symbol
    match = re.fullmatch(r"([a-z_]+)(?:([/*])(\d+))?", symbol)
    if not match:
        raise ValueError(f"bad dimension symbol {symbol!r}")
    name, op, factor = match.groups()
    return name, op, int(factor) if factor else 1


def dim_range(symbol, dims: Mapping[str, DimRange] | None = None) -> DimRange | None:
    """Range of a dynamic (or derived) symbol; None for fixed and static symbols."""
    dims = DYNAMIC_DIMS if dims is None else dims
    name, op, factor = _parse_symbol(symbol)
    if name not in dims:
        return None
    base = dims[name]
    if op == "/":
        return DimRange(max(1, base.min // factor), max(1, base.opt // factor),
                        max(1, base.max // factor), max(1, base.multiple_of // factor))
    if op == "*":
        return DimRange(base.min * factor, base.opt * factor, base.max * factor, base.multiple_of * factor)
    return base


def is_dynamic(symbol) -> bool:
    return dim_range(symbol) is not None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple
    doc: str = ""
    #: Value bounds for validation and sample inputs. ``low`` is inclusive; ``high`` is inclusive
    #: for floats and exclusive for integers, and may name a static dim (``"text_vocab_size"``).
    low: float | None = None
    high: float | str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype}")
        for symbol in self.shape:
            _parse_symbol(symbol)

    @property
    def np_dtype(self):
        return np.dtype(DTYPES[self.dtype])

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX-style ``{axis: symbol}`` for the dynamic axes of this tensor."""
        return {axis: symbol for axis, symbol in enumerate(self.shape) if is_dynamic(symbol)}

    def resolve(self, static: Mapping[str, int]) -> "TensorSpec":
        """Substitute static sizes; dynamic symbols stay symbolic."""
        shape = []
        for symbol in self.shape:
            name, _, _ = _parse_symbol(symbol)
            if name is None or is_dynamic(symbol):
                shape.append(symbol)
            elif name in static:
                shape.append(int(static[name]))
            else:
                raise ContractError(f"tensor {self.name!r}: static dimension {name!r} has no value in the bundle config")
        high = self.high
        if isinstance(high, str):
            if high not in static:
                raise ContractError(f"tensor {self.name!r}: value bound {high!r} has no value in the bundle config")
            high = static[high]
        return TensorSpec(self.name, self.dtype, tuple(shape), self.doc, self.low, high)

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Shape with every dynamic axis set from ``sizes`` (derived axes computed). Needs resolve() first."""
        out = []
        for symbol in self.shape:
            name, op, factor = _parse_symbol(symbol)
            if name is None:
                out.append(factor)
                continue
            if name not in sizes:
                raise ContractError(f"tensor {self.name!r}: no size given for dimension {name!r}")
            value = sizes[name]
            out.append(value // factor if op == "/" else value * factor if op == "*" else value)
        return tuple(out)


@dataclass(frozen=True)
class ModelContract:
    name: str
    stage: str  # layout | background | render
    role: str  # prologue | step | epilogue
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""
    #: Static dims this model needs from the bundle config (derived from the shapes).
    static_dims: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate tensor names {names}")
        static = []
        for tensor in self.inputs + self.outputs:
            for symbol in tensor.shape:
                name, _, _ = _parse_symbol(symbol)
                if name is not None and not is_dynamic(symbol) and name not in static:
                    static.append(name)
            if isinstance(tensor.high, str) and tensor.high not in static:
                static.append(tensor.high)
        object.__setattr__(self, "static_dims", tuple(static))

    @property
    def batch_dim(self) -> str:
        return self.inputs[0].shape[0]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: symbol}}`` for torch.onnx.export."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def input_dims(self) -> list[str]:
        """Base names of the dynamic axes the inputs use, in first-seen order."""
        seen = []
        for tensor in self.inputs:
            for symbol in tensor.shape:
                if is_dynamic(symbol):
                    name = _parse_symbol(symbol)[0]
                    if name not in seen:
                        seen.append(name)
        return seen

    def resolve(self, static: Mapping[str, int]) -> "ModelContract":
        missing = [d for d in self.static_dims if d not in static]
        if missing:
            raise ContractError(f"model {self.name!r}: the bundle config lacks static dimensions {missing}")
        return ModelContract(self.name, self.stage, self.role,
                             tuple(t.resolve(static) for t in self.inputs),
                             tuple(t.resolve(static) for t in self.outputs), self.doc)


def _find(tensors, name, model, kind):
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise ContractError(f"model {model!r} has no {kind} {name!r}; it has {[t.name for t in tensors]}")


def _t(name, dtype, shape, doc="", low=None, high=None):
    return TensorSpec(name, dtype, tuple(shape), doc, low, high)


F32, I64 = "float32", "int64"

# ---------------------------------------------------------------------------------------------
# Layout: RADM
# ---------------------------------------------------------------------------------------------
RADM_BACKBONE = ModelContract(
    "radm_backbone", "layout", PROLOGUE,
    inputs=(_t("image", F32, ("batch", 3, "height", "width"), "RGB, 0..255; normalized in the graph", 0, 255),),
    outputs=tuple(_t(f"p{level}", F32, ("batch", "fpn_channels", f"height/{2 ** level}", f"width/{2 ** level}"),
                     f"FPN level P{level}, stride {2 ** level}") for level in (2, 3, 4, 5)),
    doc="ResNet-50 + FPN; runs once per request.",
)

RADM_TEXT_ENCODER = ModelContract(
    "radm_text_encoder", "layout", PROLOGUE,
    inputs=(
        _t("input_ids", I64, ("text_rows", "text_tokens"), "one row per text line", 0, "text_vocab_size"),
        _t("attention_mask", I64, ("text_rows", "text_tokens"), "1 for tokens, 0 for padding", 0, 2),
    ),
    outputs=(_t("text_features", F32, ("text_rows", "text_dim"), "pooled feature of each line"),),
    doc="RoBERTa-style encoder; one pooled vector per text line. Batched over lines.",
)

RADM_HEAD = ModelContract(
    "radm_head", "layout", STEP,
    inputs=(
        *(_t(f"p{level}", F32, ("batch", "fpn_channels", f"height/{2 ** level}", f"width/{2 ** level}"))
          for level in (2, 3, 4, 5)),
        _t("boxes", F32, ("batch", "proposals", 4), "noisy proposals, pixel x1y1x2y2"),
        _t("timestep", F32, ("batch",), "diffusion time index", 0, 1000),
        _t("text_features", F32, ("batch", "lines", "text_dim")),
        _t("text_mask", F32, ("batch", "lines"), "1 for a text line, 0 for padding", 0, 1),
        _t("image_size", F32, ("batch", 2), "(height, width) of the image in pixels", 1, 65536),
    ),
    outputs=(
        _t("class_logits", F32, ("batch", "proposals", "num_classes"), "sigmoid logits of the last stage"),
        _t("pred_boxes", F32, ("batch", "proposals", 4), "x0 prediction, pixel x1y1x2y2"),
    ),
    doc="6-stage cascade (RoIAlign, self-attention, DynamicConv, VTRAM, GRAM); one call per step.",
)

# ---------------------------------------------------------------------------------------------
# Layout: PlanNet
# ---------------------------------------------------------------------------------------------
PLANNET_ENCODER = ModelContract(
    "plannet_encoder", "layout", PROLOGUE,
    inputs=(
        _t("image", F32, ("batch", 3, "plan_image_size", "plan_image_size"), "product image RGB 0..1", 0, 1),
        _t("text_ids", I64, ("batch", "lines", "text_tokens"), "token ids per text line", 0, "text_vocab_size"),
        _t("text_mask", F32, ("batch", "lines", "text_tokens"), "1 for tokens, 0 for padding", 0, 1),
    ),
    outputs=(
        _t("memory", F32, ("batch", "memory_tokens", "plan_dim"), "image patch tokens then one token per line"),
        _t("memory_mask", F32, ("batch", "memory_tokens"), "1 for a real token", 0, 1),
    ),
    doc="Image + text tokens for the PlanNet denoiser's cross-attention; once per request.",
)

PLANNET_DENOISER = ModelContract(
    "plannet_denoiser", "layout", STEP,
    inputs=(
        _t("tokens", I64, ("batch", "max_elements", 5), "(class, x, y, w, h); mask_token = absorbed", 0, "plan_vocab_size"),
        _t("timestep", F32, ("batch",), "discrete diffusion step", 0, 1000),
        _t("memory", F32, ("batch", "memory_tokens", "plan_dim")),
        _t("memory_mask", F32, ("batch", "memory_tokens"), low=0, high=1),
    ),
    outputs=(_t("logits", F32, ("batch", "max_elements", 5, "plan_num_bins"), "logits of x0 per attribute"),),
    doc="Absorbing-state discrete diffusion transformer, adaptive LayerNorm on the timestep.",
)

# ---------------------------------------------------------------------------------------------
# Background generator and RenderNet (Stable Diffusion family)
# ---------------------------------------------------------------------------------------------
CLIP_TEXT_ENCODER = ModelContract(
    "clip_text_encoder", "background", PROLOGUE,
    inputs=(_t("input_ids", I64, ("cfg_batch", "clip_tokens"), "CLIP BPE ids, padded to 77", 0, "clip_vocab_size"),),
    outputs=(_t("text_embeddings", F32, ("cfg_batch", "clip_tokens", "cross_attention_dim")),),
    doc="CLIP text model last hidden state.",
)

IMAGE_ENCODER = ModelContract(
    "image_encoder", "background", PROLOGUE,
    inputs=(_t("image", F32, ("batch", 3, "clip_image_size", "clip_image_size"), "style reference RGB 0..1", 0, 1),),
    outputs=(_t("image_prompt_embeds", F32, ("batch", "image_tokens", "cross_attention_dim")),),
    doc="CLIP vision model + personalization projection to extra context tokens.",
)

VAE_ENCODER = ModelContract(
    "vae_encoder", "background", PROLOGUE,
    inputs=(_t("image", F32, ("batch", 3, "height", "width"), "RGB in -1..1", -1, 1),),
    outputs=(_t("latent", F32, ("batch", "latent_channels", "height/8", "width/8"), "posterior mean x scaling factor"),),
)

VAE_DECODER = ModelContract(
    "vae_decoder", "background", EPILOGUE,
    inputs=(_t("latent", F32, ("batch", "latent_channels", "height/8", "width/8"), "scaled latent"),),
    outputs=(_t("image", F32, ("batch", 3, "height", "width"), "RGB in 0..1", 0, 1),),
    doc="Divides by the scaling factor and maps to 0..1 in the graph.",
)

BG_UNET = ModelContract(
    "bg_unet", "background", STEP,
    inputs=(
        _t("sample", F32, ("cfg_batch", "latent_channels", "height/8", "width/8"), "noisy latent (scaled by the sampler)"),
        _t("timestep", F32, ("cfg_batch",), low=0, high=1000),
        _t("encoder_hidden_states", F32, ("cfg_batch", "clip_tokens", "cross_attention_dim")),
        _t("masked_image_latents", F32, ("cfg_batch", "latent_channels", "height/8", "width/8")),
        _t("mask", F32, ("cfg_batch", 1, "height/8", "width/8"), "1 = background to paint, 0 = product", 0, 1),
        _t("category_token_mask", F32, ("cfg_batch", "clip_tokens"), "1 marks the category identifier tokens", 0, 1),
        _t("image_prompt_embeds", F32, ("cfg_batch", "image_tokens", "cross_attention_dim")),
        _t("ip_scale", F32, ("cfg_batch",), "image-prompt attention scale", 0, 10),
    ),
    outputs=(_t("noise_pred", F32, ("cfg_batch", "latent_channels", "height/8", "width/8")),),
    doc="9-channel inpainting UNet with mask-guided category attention and image-prompt attention.",
)

RENDER_CONDITION = ModelContract(
    "render_condition", "render", PROLOGUE,
    inputs=(
        _t("layout_masks", F32, ("batch", "layout_channels", "height", "width"),
           "one mask per element class, then the product box", 0, 1),
        _t("product_image", F32, ("batch", 3, "height", "width"), "product RGB 0..1 on a blank canvas", 0, 1),
    ),
    outputs=(_t("control_embedding", F32, ("batch", "control_channels", "height/8", "width/8")),),
    doc="Spatial fusion module + the ControlNet's condition embedding; once per request.",
)

RENDER_UNET = ModelContract(
    "render_unet", "render", STEP,
    inputs=(
        _t("sample", F32, ("cfg_batch", "latent_channels", "height/8", "width/8")),
        _t("timestep", F32, ("cfg_batch",), low=0, high=1000),
        _t("encoder_hidden_states", F32, ("cfg_batch", "clip_tokens", "cross_attention_dim")),
        _t("control_embedding", F32, ("cfg_batch", "control_channels", "height/8", "width/8")),
        _t("control_scale", F32, ("cfg_batch",), "ControlNet conditioning scale", 0, 10),
    ),
    outputs=(_t("noise_pred", F32, ("cfg_batch", "latent_channels", "height/8", "width/8")),),
    doc="ControlNet trunk + UNet in one graph: the 13 residuals never leave the model.",
)

# ---------------------------------------------------------------------------------------------
# Feature caching between steps (DeepCache, arXiv 2312.00858): each UNet-class step model has two
# more graphs. The *deep* step is the full step that also returns the input of the UNet's last up
# block; the *shallow* step runs only conv_in, the first down block, the last up block and the
# output convolutions on a deep feature cached at an earlier step. Same weights as the plain step.
# ---------------------------------------------------------------------------------------------
#: The cached tensor: what the second-to-last up block hands the last one (after its upsampler),
#: so it lives at latent resolution; its width is the UNet's second block width (640 for SD 1.5).
DEEP_FEATURE = _t("deep_feature", F32, ("cfg_batch", "deep_channels", "height/8", "width/8"),
                  "input of the UNet's last up block, cached from a deep step")


def _deep_step(plain: ModelContract) -> ModelContract:
    return ModelContract(f"{plain.name}_deep", plain.stage, STEP, plain.inputs, (*plain.outputs, DEEP_FEATURE),
                         doc=f"{plain.name}'s full step that also returns the deep feature for the cache.")


def _shallow_step(plain: ModelContract) -> ModelContract:
    return ModelContract(f"{plain.name}_shallow", plain.stage, STEP, (*plain.inputs, DEEP_FEATURE), plain.outputs,
                         doc=f"{plain.name}'s shallow path (first down block, last up block) on a cached deep feature.")


BG_UNET_DEEP, BG_UNET_SHALLOW = _deep_step(BG_UNET), _shallow_step(BG_UNET)
RENDER_UNET_DEEP, RENDER_UNET_SHALLOW = _deep_step(RENDER_UNET), _shallow_step(RENDER_UNET)

CONTRACTS: dict[str, ModelContract] = {c.name: c for c in (
    RADM_BACKBONE, RADM_TEXT_ENCODER, RADM_HEAD, PLANNET_ENCODER, PLANNET_DENOISER,
    CLIP_TEXT_ENCODER, IMAGE_ENCODER, VAE_ENCODER, VAE_DECODER, BG_UNET, RENDER_CONDITION, RENDER_UNET,
    BG_UNET_DEEP, BG_UNET_SHALLOW, RENDER_UNET_DEEP, RENDER_UNET_SHALLOW,
)}

MODEL_NAMES: tuple[str, ...] = tuple(CONTRACTS)


def get_contract(name: str) -> ModelContract:
    if name not in CONTRACTS:
        raise ContractError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return CONTRACTS[name]


def parse_model_list(text: str | None, flag: str = "--models") -> list[str]:
    """``"radm_head,bg_unet"`` -> served model names in contract order; empty/None means all."""
    from .errors import InputError

    if not text:
        return list(MODEL_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTRACTS]
    if unknown:
        raise InputError(f"{flag}: unknown model(s) {unknown}; expected names from {', '.join(MODEL_NAMES)}")
    return [n for n in MODEL_NAMES if n in names]


def parse_model_values(text: str | None, flag: str, value_name: str, example: str) -> dict[str, str]:
    """``"bg_unet=x,render_unet=y"`` -> ``{model: value}`` (strings); empty/None means none.
    Models must be served models, each given once."""
    from .errors import InputError

    values: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        model, _, value = (part.strip() for part in item.partition("="))
        if not value:
            raise InputError(f"{flag}: got {item.strip()!r}, expected MODEL={value_name} (e.g. {example})")
        if model not in CONTRACTS:
            raise InputError(f"{flag}: unknown model {model!r}; expected names from {', '.join(MODEL_NAMES)}")
        if model in values and values[model] != value:
            raise InputError(f"{flag}: model {model!r} is given twice ({values[model]!r}, {value!r})")
        values[model] = value
    return values


def parse_variant_list(text: str | None, flag: str = "--variants") -> dict[str, str]:
    """``"bg_unet=openvino-bf16,render_unet=int8"`` -> ``{model: variant}``. The variants themselves
    are checked against the bundle when a backend loads them."""
    return parse_model_values(text, flag, "VARIANT", "bg_unet=openvino-bf16")


def validate_inputs(contract: ModelContract, inputs: Mapping[str, np.ndarray], check_finite: bool = True) -> dict[str, int]:
    """Check names, dtypes, ranks, fixed sizes and dynamic ranges of one call's inputs.

    ``contract`` must be resolved. Returns the sizes bound to each dynamic axis; a dynamic axis
    seen twice must agree (``lines`` in text_features and text_mask). Raises ContractError naming
    the tensor, the axis and what was expected.
    """
    missing = [n for n in contract.input_names if n not in inputs]
    extra = [n for n in inputs if n not in contract.input_names]
    if missing or extra:
        raise ContractError(f"model {contract.name!r}: missing inputs {missing}, unexpected inputs {extra}")
    sizes: dict[str, int] = {}  # size seen for each dynamic symbol ("height", "height/4", ...)
    for spec in contract.inputs:
        array = inputs[spec.name]
        where = f"model {contract.name!r} input {spec.name!r}"
        if not isinstance(array, np.ndarray):
            raise ContractError(f"{where}: expected a numpy array, got {type(array).__name__}")
        if array.dtype != spec.np_dtype:
            raise ContractError(f"{where}: expected dtype {spec.dtype}, got {array.dtype}")
        if array.ndim != len(spec.shape):
            raise ContractError(f"{where}: expected rank {len(spec.shape)} {spec.shape}, got shape {array.shape}")
        for axis, (symbol, size) in enumerate(zip(spec.shape, array.shape)):
            rng = dim_range(symbol)
            if rng is None:
                if isinstance(symbol, int) and size != symbol:
                    raise ContractError(f"{where}: axis {axis} must be {symbol}, got {size} (shape {array.shape})")
                continue
            if symbol in sizes and sizes[symbol] != size:
                raise ContractError(f"{where}: axis {axis} ({symbol}) is {size}, but another input has "
                                    f"{symbol}={sizes[symbol]}")
            if not rng.min <= size <= rng.max or size % rng.multiple_of:
                multiple = f", a multiple of {rng.multiple_of}" if rng.multiple_of > 1 else ""
                raise ContractError(f"{where}: axis {axis} ({symbol}) must be in {rng.min}..{rng.max}{multiple}, got {size}")
            sizes[symbol] = size
        if check_finite and array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
            raise ContractError(f"{where}: contains NaN or Inf")
        _check_values(spec, array, where)
    return sizes


def _check_values(spec: TensorSpec, array: np.ndarray, where: str) -> None:
    """Value bounds: ``low`` inclusive; ``high`` inclusive for floats, exclusive for integers (ids < vocab)."""
    if not array.size:
        return
    if spec.low is not None and array.min() < spec.low:
        raise ContractError(f"{where}: values must be >= {spec.low}, got min {array.min()}")
    if isinstance(spec.high, (int, float)):
        integer = array.dtype.kind in "iu"
        if (array.max() >= spec.high) if integer else (array.max() > spec.high):
            raise ContractError(f"{where}: values must be {'<' if integer else '<='} {spec.high}, got max {array.max()}")
