"""RenderNet (Planning and Rendering, arXiv 2312.08822): a Stable Diffusion UNet driven by a ControlNet whose
condition image comes from a spatial fusion module (SFM).

Cut at the step boundary (networks.md section 4):

* ``render_condition`` (prologue): SFM(layout masks, product image, coordinates) -> condition image ->
  the ControlNet's own ``controlnet_cond_embedding`` -> ``control_embedding`` [B, C0, H/8, W/8]. Nothing in it
  depends on the step, so it runs once per request.
* ``render_unet`` (step): the rest of the ControlNet (``conv_in`` + time embedding + down blocks + mid block +
  zero convolutions), which adds the precomputed embedding to ``conv_in(sample)`` exactly where
  ``ControlNetModel.forward`` adds it, then the UNet consuming the 12 + 1 residuals scaled per sample by
  ``control_scale``. One graph, so the 13 residual tensors never leave the model.

Both halves call diffusers' own submodules (no copy of diffusers' code), and both come from one
``ControlNetModel`` built with one fixed seed (or loaded from one folder), so they always share weights.

Weights: ``--from-pretrained render_unet=DIR controlnet=DIR`` (diffusers folders: a 4-channel SD UNet and a
ControlNetModel) and ``--checkpoint sfm=FILE`` (safetensors / state dict of :class:`SpatialFusion`); anything
not given is deterministic random weights of the preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from posterrt.runtime.contracts import get_contract
from posterrt.runtime.errors import CheckpointError, InputError

from ..checkpoints import load_into, read_state_dict
from ..spec import ContractModule, Exportable
from .feature_cache import ShallowUNet, deep_channels, first_block_residuals, run_capturing_deep_feature
from .stable_diffusion import SD15_SCHEDULER  # RenderNet samples with SD 1.5's schedule

#: Order of the ``layout_masks`` channels: one mask per element class of the plan, then the product box.
LAYOUT_CHANNELS = ("logo", "text", "underlay", "embellishment", "product")

SEEDS = {"controlnet": 20231214, "unet": 20231215, "sfm": 20231216}


@dataclass(frozen=True)
class RenderNetPreset:
    """Sizes of the random-weight networks. Pretrained folders bring their own config instead."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_head_dim: int  # diffusers' legacy name: the number of heads in SD 1.5 configs
    norm_num_groups: int
    conditioning_embedding_out_channels: tuple[int, ...]  # 4 entries: the embedding downsamples by 8
    sfm_hidden_channels: int
    sample_size: int  # latent size recorded in the UNet config (not used by the graph)
    latent_channels: int = 4
    clip_tokens: int = 77
    conditioning_channels: int = 3  # the condition image is RGB-like, as ControlNets are trained

    def down_block_types(self) -> tuple[str, ...]:
        return ("CrossAttnDownBlock2D",) * (len(self.block_out_channels) - 1) + ("DownBlock2D",)

    def up_block_types(self) -> tuple[str, ...]:
        return ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(self.block_out_channels) - 1)

    def unet_config(self) -> dict:
        return dict(sample_size=self.sample_size, in_channels=self.latent_channels, out_channels=self.latent_channels,
                    down_block_types=self.down_block_types(), up_block_types=self.up_block_types(),
                    block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    cross_attention_dim=self.cross_attention_dim, attention_head_dim=self.attention_head_dim,
                    norm_num_groups=self.norm_num_groups)

    def controlnet_config(self) -> dict:
        return dict(in_channels=self.latent_channels, down_block_types=self.down_block_types(),
                    block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    cross_attention_dim=self.cross_attention_dim, attention_head_dim=self.attention_head_dim,
                    norm_num_groups=self.norm_num_groups, conditioning_channels=self.conditioning_channels,
                    conditioning_embedding_out_channels=self.conditioning_embedding_out_channels)


PRESETS = {
    # Same block structure as the paper (4 levels, 2 layers each: 12 + 1 residuals), tiny widths.
    # cross_attention_dim 32 matches the tiny CLIP text encoder of the stable_diffusion family.
    "tiny": RenderNetPreset(block_out_channels=(16, 32, 32, 32), layers_per_block=2, cross_attention_dim=32,
                            attention_head_dim=2, norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16, 16),
                            sfm_hidden_channels=8, sample_size=32),
    # SD 1.5 sizes; ControlNet conditioning embedding as in the ControlNet paper's SD 1.5 release.
    "paper": RenderNetPreset(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                             attention_head_dim=8, norm_num_groups=32,
                             conditioning_embedding_out_channels=(16, 32, 96, 256), sfm_hidden_channels=32,
                             sample_size=64),
}


# ---------------------------------------------------------------------------------------------
# Spatial fusion module
# ---------------------------------------------------------------------------------------------
def coordinate_grid(reference: torch.Tensor) -> torch.Tensor:
    """x and y of each pixel centre in [-1, 1], shaped [B, 2, H, W] like ``reference``.

    Made in the graph from the input's own shape, so it follows any (dynamic) height and width.
    """
    batch, _, height, width = reference.shape
    xs = (torch.arange(width, dtype=reference.dtype, device=reference.device) + 0.5) * (2.0 / width) - 1.0
    ys = (torch.arange(height, dtype=reference.dtype, device=reference.device) + 0.5) * (2.0 / height) - 1.0
    grid_x = xs.view(1, 1, 1, -1).expand(batch, 1, height, width)
    grid_y = ys.view(1, 1, -1, 1).expand(batch, 1, height, width)
    return torch.cat([grid_x, grid_y], dim=1)


class SpatialFusion(nn.Module):
    """SFM: planned layout + product image + where-am-I coordinates -> the ControlNet's condition image.

    Design (ours; the paper gives no architecture): the layout masks, the product RGB and an (x, y) grid
    are stacked (layout_channels + 3 + 2 channels) and mixed by four 3x3 convolutions at full resolution
    (SiLU between them). The coordinates let the convolutions tell positions apart (a text box near
    the edge is not one in the centre), which plain convolutions cannot. A sigmoid keeps the output in
    0..1, the range ControlNet condition images have, so a ControlNet trained on image conditions
    starts from familiar inputs.
    """

    def __init__(self, layout_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(layout_channels + 3 + 2, hidden_channels, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1) for _ in range(2))
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, kernel_size=3, padding=1)
        self.act = nn.SiLU()

    def forward(self, layout_masks: torch.Tensor, product_image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([layout_masks, product_image, coordinate_grid(layout_masks)], dim=1)
        x = self.act(self.conv_in(x))
        for block in self.blocks:
            x = self.act(block(x))
        return torch.sigmoid(self.conv_out(x))


# ---------------------------------------------------------------------------------------------
# The two served graphs
# ---------------------------------------------------------------------------------------------
class RenderCondition(nn.Module):
    """render_condition: SFM, then the ControlNet's condition embedding (the prologue half of the ControlNet)."""

    def __init__(self, sfm: SpatialFusion, controlnet):
        super().__init__()
        self.sfm = sfm
        self.cond_embedding = controlnet.controlnet_cond_embedding
        # ControlNetModel.forward flips a "bgr" ControlNet's condition before embedding it; so do we.
        self.flip_channels = controlnet.config.controlnet_conditioning_channel_order == "bgr"

    def forward(self, layout_masks: torch.Tensor, product_image: torch.Tensor) -> torch.Tensor:
        condition = self.sfm(layout_masks, product_image)
        if self.flip_channels:
            condition = torch.flip(condition, dims=[1])
        return self.cond_embedding(condition)


class ControlNetTrunk(nn.Module):
    """Everything of a ControlNetModel after its condition embedding, fed the precomputed embedding.

    The steps are those of ``ControlNetModel.forward`` (diffusers), run on the ControlNet's own submodules;
    the conditioning scale is per sample ([B]) instead of one float, so one batch can mix scales
    (classifier-free guidance with an unconditioned half, for instance).
    """

    def __init__(self, controlnet):
        super().__init__()
        self.conv_in = controlnet.conv_in
        self.time_proj = controlnet.time_proj
        self.time_embedding = controlnet.time_embedding
        self.down_blocks = controlnet.down_blocks
        self.controlnet_down_blocks = controlnet.controlnet_down_blocks
        self.mid_block = controlnet.mid_block
        self.controlnet_mid_block = controlnet.controlnet_mid_block

    def forward(self, sample, timestep, encoder_hidden_states, control_embedding, control_scale):
        emb = self.time_embedding(self.time_proj(timestep).to(dtype=sample.dtype))
        hidden = self.conv_in(sample) + control_embedding
        residuals = [hidden]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, block_residuals = block(hidden_states=hidden, temb=emb,
                                                encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, block_residuals = block(hidden_states=hidden, temb=emb)
            residuals.extend(block_residuals)
        if getattr(self.mid_block, "has_cross_attention", False):
            hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = self.mid_block(hidden, emb)
        assert len(residuals) == len(self.controlnet_down_blocks), "one zero convolution per residual"
        scale = control_scale.to(sample.dtype).view(-1, 1, 1, 1)
        down = tuple(zero_conv(r) * scale for r, zero_conv in zip(residuals, self.controlnet_down_blocks))
        mid = self.controlnet_mid_block(hidden) * scale
        return down, mid


class ControlledUNet(nn.Module):
    """render_unet: ControlNet trunk + UNet in one graph; outputs the UNet's noise prediction."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.trunk = ControlNetTrunk(controlnet)
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, control_embedding, control_scale):
        down, mid = self.trunk(sample, timestep, encoder_hidden_states, control_embedding, control_scale)
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class ControlledUNetDeep(ControlledUNet):
    """render_unet_deep: render_unet's forward, plus the UNet's deep feature for the cache (``feature_cache.py``)."""

    def forward(self, sample, timestep, encoder_hidden_states, control_embedding, control_scale):
        down, mid = self.trunk(sample, timestep, encoder_hidden_states, control_embedding, control_scale)
        return run_capturing_deep_feature(self.unet, sample, timestep, encoder_hidden_states,
                                          down_block_additional_residuals=down, mid_block_additional_residual=mid)


class ShallowControlNetTrunk(nn.Module):
    """The ControlNet's residuals for the skip connections the shallow step has: conv_in's and the first
    down block's layers', each through its zero convolution and scaled, as in :class:`ControlNetTrunk`."""

    def __init__(self, controlnet):
        super().__init__()
        self.conv_in = controlnet.conv_in
        self.time_proj = controlnet.time_proj
        self.time_embedding = controlnet.time_embedding
        self.first_block = controlnet.down_blocks[0]
        count = 1 + len(self.first_block.resnets)
        self.zero_convs = nn.ModuleList(controlnet.controlnet_down_blocks[:count])

    def forward(self, sample, timestep, encoder_hidden_states, control_embedding, control_scale):
        emb = self.time_embedding(self.time_proj(timestep).to(dtype=sample.dtype))
        hidden = self.conv_in(sample) + control_embedding
        residuals = (hidden, *first_block_residuals(self.first_block, hidden, emb, encoder_hidden_states))
        scale = control_scale.to(sample.dtype).view(-1, 1, 1, 1)
        return tuple(zero_conv(r) * scale for r, zero_conv in zip(residuals, self.zero_convs))


class ControlledUNetShallow(nn.Module):
    """render_unet_shallow: the ControlNet's shallow residuals, then the UNet's shallow path on the cached feature."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.trunk = ShallowControlNetTrunk(controlnet)
        self.shallow = ShallowUNet(unet)

    def forward(self, sample, timestep, encoder_hidden_states, control_embedding, control_scale, deep_feature):
        additions = self.trunk(sample, timestep, encoder_hidden_states, control_embedding, control_scale)
        return self.shallow(sample, timestep, encoder_hidden_states, deep_feature, residual_additions=additions)


UNET_GRAPHS = {"render_unet": ControlledUNet, "render_unet_deep": ControlledUNetDeep,
               "render_unet_shallow": ControlledUNetShallow}


# ---------------------------------------------------------------------------------------------
# Weights: deterministic random, or diffusers folders / an SFM checkpoint
# ---------------------------------------------------------------------------------------------
def _preset(preset: str) -> RenderNetPreset:
    if preset not in PRESETS:
        raise InputError(f"--preset: rendernet has no preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _randomize_zero_convs(controlnet, generator: torch.Generator) -> None:
    """A fresh ControlNet's zero convolutions (and embedding output) are zero by design, so its control
    path would contribute nothing and parity checks would not see it. Random weights stand in for a
    trained ControlNet: give them small random values (deterministic: seeded generator)."""
    zero_modules = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                    controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for module in zero_modules:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _load_pretrained(cls, path: str, flag: str):
    """A diffusers folder of class ``cls``, refused with one line when it is missing or of another class."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"--from-pretrained {flag}={path}: no config.json there; expected a diffusers "
                              f"{cls.__name__} folder (save_pretrained output)")
    try:
        config = cls.load_config(str(folder))
    except Exception as error:
        raise CheckpointError(f"--from-pretrained {flag}={path}: config.json cannot be read ({error})") from None
    if config.get("_class_name") not in (None, cls.__name__):
        raise CheckpointError(f"--from-pretrained {flag}={path}: the folder holds a {config['_class_name']}, "
                              f"expected a {cls.__name__}")
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32)
    except Exception as error:  # diffusers raises many types for missing or mismatched weights
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"--from-pretrained {flag}={path}: cannot load the {cls.__name__} ({message})") from None


def build_controlnet(preset: str, sources) -> "ControlNetModel":  # noqa: F821 (diffusers type)
    """The whole ControlNetModel both served graphs take their parts from (same seed, same folder)."""
    from diffusers import ControlNetModel

    path = sources.pretrained.get("controlnet")
    if path:
        controlnet = _load_pretrained(ControlNetModel, path, "controlnet")
    else:
        torch.manual_seed(SEEDS["controlnet"])
        controlnet = ControlNetModel(**_preset(preset).controlnet_config())
        _randomize_zero_convs(controlnet, torch.Generator().manual_seed(SEEDS["controlnet"] + 1))
    _check_controlnet(controlnet, path or f"preset {preset}")
    return controlnet.eval()


def build_unet(preset: str, sources) -> "UNet2DConditionModel":  # noqa: F821 (diffusers type)
    from diffusers import UNet2DConditionModel

    path = sources.pretrained.get("render_unet")
    if path:
        unet = _load_pretrained(UNet2DConditionModel, path, "render_unet")
    else:
        torch.manual_seed(SEEDS["unet"])
        unet = UNet2DConditionModel(**_preset(preset).unet_config())
    return unet.eval()


def build_sfm(preset: str, sources, layout_channels: int, out_channels: int) -> SpatialFusion:
    torch.manual_seed(SEEDS["sfm"])
    sfm = SpatialFusion(layout_channels, _preset(preset).sfm_hidden_channels, out_channels)
    path = sources.checkpoints.get("sfm")
    if path:
        load_into(sfm, read_state_dict(path), f"sfm={path}")
    return sfm.eval()


def _check_controlnet(controlnet, where: str) -> None:
    """Refuse ControlNet options the split graphs do not carry (extra embeddings, pooled conditions)."""
    config = controlnet.config
    unsupported = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim_type": None,
                   "global_pool_conditions": False}
    for key, supported in unsupported.items():
        if config.get(key, supported) != supported:
            raise CheckpointError(f"controlnet {where}: config {key}={config[key]!r} is not supported by "
                                  f"render_unet (expected {supported!r}: an SD 1.5-style ControlNet)")


def check_pair(controlnet, unet, where: str) -> None:
    """The ControlNet's residuals must fit the UNet: same latent channels, widths, depth and context size."""
    c, u = controlnet.config, unet.config
    if u.in_channels != u.out_channels or u.in_channels != c.in_channels:
        raise CheckpointError(f"render_unet {where}: UNet in_channels={u.in_channels}, out_channels={u.out_channels}, "
                              f"ControlNet in_channels={c.in_channels}; expected one latent width (4 for SD 1.5; "
                              f"a 9-channel inpainting UNet is the background generator's, not RenderNet's)")
    for key in ("cross_attention_dim", "block_out_channels", "layers_per_block"):
        if tuple(_as_tuple(u[key])) != tuple(_as_tuple(c[key])):
            raise CheckpointError(f"render_unet {where}: ControlNet {key}={c[key]!r} does not match the UNet's "
                                  f"{u[key]!r}; expected a ControlNet made for this UNet")
    if len(u.down_block_types) != len(c.down_block_types):
        raise CheckpointError(f"render_unet {where}: ControlNet has {len(c.down_block_types)} down blocks, the UNet "
                              f"{len(u.down_block_types)}; expected the same")
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if u.get(key) is not None:
            raise CheckpointError(f"render_unet {where}: UNet config {key}={u[key]!r} needs inputs render_unet does "
                                  f"not have; expected None (an SD 1.5-style UNet)")


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


# ---------------------------------------------------------------------------------------------
# Family interface (export/bundle_writer.py)
# ---------------------------------------------------------------------------------------------
def family_config(control_channels: int) -> dict:
    """What the runtime needs to drive RenderNet (recorded in the manifest under ``config.rendernet``)."""
    return {
        "layout_channels": list(LAYOUT_CHANNELS),
        "control_channels": control_channels,
        "scheduler": dict(SD15_SCHEDULER),
        "default_control_scale": 1.0,
    }


def build(model: str, preset: str, sources) -> Exportable:
    controlnet = build_controlnet(preset, sources)
    control_channels = int(controlnet.config.block_out_channels[0])
    config = family_config(control_channels)
    if model == "render_condition":
        sfm = build_sfm(preset, sources, len(LAYOUT_CHANNELS), int(controlnet.config.conditioning_channels))
        module = RenderCondition(sfm, controlnet)
        static = {"layout_channels": len(LAYOUT_CHANNELS), "control_channels": control_channels}
    elif model in UNET_GRAPHS:
        if bool(sources.pretrained.get("render_unet")) != bool(sources.pretrained.get("controlnet")):
            raise InputError("--from-pretrained: render_unet=DIR and controlnet=DIR come together (a ControlNet "
                             "is trained for one UNet); got only one of them")
        unet = build_unet(preset, sources)
        check_pair(controlnet, unet, sources.pretrained.get("render_unet") or f"preset {preset}")
        module = UNET_GRAPHS[model](controlnet, unet)
        static = {"latent_channels": int(unet.config.in_channels), "clip_tokens": _preset(preset).clip_tokens,
                  "cross_attention_dim": int(unet.config.cross_attention_dim), "control_channels": control_channels}
        if model != "render_unet":
            static["deep_channels"] = deep_channels(unet)
    else:
        raise InputError(f"model {model!r} is not a rendernet model; expected render_condition or one of "
                         f"{', '.join(UNET_GRAPHS)}")
    contract = get_contract(model)
    assert set(static) == set(contract.static_dims), (static, contract.static_dims)
    return Exportable(model, ContractModule(module, contract.output_names).eval(), static, config)


def write_assets(preset: str, sources, folder: Path) -> dict:
    """RenderNet brings no files of its own: its prompt goes through the stable_diffusion family's CLIP tokenizer."""
    return {}
