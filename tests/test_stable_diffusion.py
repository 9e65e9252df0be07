"""The Stable-Diffusion family (export side): the five background-generator models, their adapters,
and loading diffusers/transformers folders from disk."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from posterrt.export.bundle_writer import Sources, export_bundle
from posterrt.export.networks import stable_diffusion as sd
from posterrt.export.networks.adapters import (AdapterInputs, BackgroundCrossAttnProcessor, ImagePromptProjection,
                                               adapter_state_dict, background_at_level, install_adapters,
                                               unet_adapter_state)
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.errors import CheckpointError
from posterrt.runtime.samples import default_sizes

# ONNX Runtime against PyTorch on the same inputs: the exporter's fp32 tolerance (relative to the
# output's largest magnitude).
RTOL = 1e-4


def max_rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def unet_inputs(batch=2, latent=16, tokens=77, cross=32, image_tokens=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g),
        timestep=torch.tensor([10.0, 700.0][:batch]),
        encoder_hidden_states=torch.randn(batch, tokens, cross, generator=g),
        masked_image_latents=torch.randn(batch, 4, latent, latent, generator=g),
        mask=torch.ones(batch, 1, latent, latent),
        category_token_mask=torch.zeros(batch, tokens),
        image_prompt_embeds=torch.randn(batch, image_tokens, cross, generator=g),
        ip_scale=torch.zeros(batch),
    )


def run_onnx(path, inputs: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.ascontiguousarray(v.numpy() if torch.is_tensor(v) else v) for k, v in inputs.items()})


# ---------------------------------------------------------------------------------------------
# Tiny preset: export, parity, manifest config, tokenizer asset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "tiny"
    export_bundle("tiny", list(sd.MODELS), out, progress=False)
    return Bundle(out)


def test_tiny_export_passes_parity_at_two_sizes(tiny_sd_bundle):
    for name in sd.MODELS:
        parity = tiny_sd_bundle.manifest["models"][name]["parity"]
        assert parity["passed"] and parity["max_rel"] <= RTOL, (name, parity)
        assert len(parity["runs"]) == 2
    runs = tiny_sd_bundle.manifest["models"]["bg_unet"]["parity"]["runs"]
    assert {r["sizes"]["height"] for r in runs} == {256, 320}  # latent 32 and 40


def test_tiny_static_dims_and_contract(tiny_sd_bundle):
    assert tiny_sd_bundle.models["bg_unet"].static_dims == {
        "latent_channels": 4, "clip_tokens": 77, "cross_attention_dim": 32, "image_tokens": 4}
    assert tiny_sd_bundle.models["image_encoder"].static_dims["clip_image_size"] == sd.TINY.clip_image_size
    contract = tiny_sd_bundle.contract("bg_unet")
    assert contract.input("encoder_hidden_states").shape[1:] == (77, 32)


def test_manifest_config_drives_the_pipeline(tiny_sd_bundle):
    config = tiny_sd_bundle.config["stable_diffusion"]
    assert config["scaling_factor"] == pytest.approx(0.18215)
    assert config["vae_scale_factor"] == 8 and config["clip_tokens"] == 77 and config["image_tokens"] == 4
    assert config["scheduler"] == {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "timestep_spacing": "leading"}
    assert "{category}" in config["prompt_template"]
    assert config["adapter_weights"] == "random"
    json.dumps(config)  # JSON-able

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_sd_bundle.file(tiny_sd_bundle.manifest["assets"]["clip_tokenizer"], "tok")))
    ids = tokenizer.encode(config["prompt_template"].format(category="运动鞋", style="sunny beach")).ids
    assert ids[0] == config["bos_token_id"] and ids[-1] == config["eos_token_id"]
    assert max(ids) < tiny_sd_bundle.models["clip_text_encoder"].static_dims["clip_vocab_size"]


def test_build_is_deterministic():
    first = sd.build("bg_unet", "tiny", Sources()).module.state_dict()
    second = sd.build("bg_unet", "tiny", Sources()).module.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    adapter = [k for k in first if k.endswith("to_k_ip.weight")]
    assert adapter and all(first[k].abs().sum() > 0 for k in adapter)  # tiny adapters are random, not zero


def test_vae_scale_factor_is_8_for_both_presets():
    for preset in ("tiny", "paper"):
        assert 2 ** (len(sd.vae_config(preset)["block_out_channels"]) - 1) == 8


def test_paper_unet_is_sd15_inpainting_sized():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # sizes only, no 3.4 GB of memory
        unet = UNet2DConditionModel(**sd.unet_config("paper", 9))
    # SD 1.5 inpainting's UNet has 859,535,364 parameters (859,520,964 for the 4-channel text-to-image one).
    assert sum(p.numel() for p in unet.parameters()) == 859_535_364


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------
def tiny_unet(in_channels=9, seed=3):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**sd.unet_config("tiny", in_channels)).eval()


def test_idle_adapters_equal_the_plain_diffusers_unet():
    """ip_scale 0, all-background mask, no category token: exactly SD's inpainting UNet."""
    adapted = sd.build("bg_unet", "tiny", Sources()).module.inner
    plain = tiny_unet()
    weights = {k.removeprefix("unet."): v for k, v in adapted.state_dict().items() if ".processor." not in k}
    plain.load_state_dict(weights, strict=True)
    inputs = unet_inputs()
    with torch.no_grad():
        got = adapted(**inputs)
        concatenated = torch.cat([inputs["sample"], inputs["mask"], inputs["masked_image_latents"]], dim=1)
        want = plain(concatenated, inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert max_rel(got, want) < 1e-5


def test_adapters_change_the_output_when_active():
    adapted = sd.build("bg_unet", "tiny", Sources()).module.inner
    inputs = unet_inputs()
    with torch.no_grad():
        idle = adapted(**inputs)
        with_ip = adapted(**{**inputs, "ip_scale": torch.ones(2)})
        masked = adapted(**{**inputs, "mask": torch.zeros_like(inputs["mask"]),
                            "category_token_mask": torch.nn.functional.pad(torch.ones(2, 2), (3, 72))})
    assert max_rel(with_ip, idle) > 1e-3 and max_rel(masked, idle) > 1e-3


def test_ip_scale_is_per_sample():
    adapted = sd.build("bg_unet", "tiny", Sources()).module.inner
    inputs = {**unet_inputs(), "ip_scale": torch.tensor([0.0, 1.0])}
    other = {**inputs, "image_prompt_embeds": torch.randn_like(inputs["image_prompt_embeds"])}
    with torch.no_grad():
        a, b = adapted(**inputs), adapted(**other)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # scale 0: the image prompt does not matter
    assert not torch.allclose(a[1], b[1], atol=1e-3)


def test_background_mask_is_min_pooled_to_each_level():
    mask = torch.ones(1, 1, 8, 8)
    mask[0, 0, 5, 2] = 0  # one product pixel
    level1 = background_at_level(mask, 1).view(4, 4)
    assert level1[2, 1] == 0 and level1.sum() == 15  # the cell touching the product is product
    assert background_at_level(mask, 0).view(8, 8).equal(mask[0, 0])
    assert background_at_level(mask, 3).item() == 0


def test_category_tokens_get_no_attention_from_the_product():
    """Processor level: with the category tokens' context changed, product queries see no change
    (their attention to those tokens is zero); background queries do."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    processor = BackgroundCrossAttnProcessor(16, 8, level=1)
    attn.set_processor(processor)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :4, :4] = 0  # product in the top-left quadrant of the latent
    category = torch.zeros(2, 6)
    category[:, 2:4] = 1
    adapter = AdapterInputs(mask, category, torch.randn(2, 4, 8), torch.tensor([0.5, 1.0]))
    hidden = torch.randn(2, 16, 16)  # level 1: 4 x 4 queries
    context = torch.randn(2, 6, 8)
    changed = context.clone()
    changed[:, 2:4] = torch.randn(2, 2, 8) * 5
    with torch.no_grad():
        before = attn(hidden, context, adapter_inputs=adapter)
        after = attn(hidden, changed, adapter_inputs=adapter)
    product = background_at_level(mask, 1)[0] == 0
    assert product.sum() == 4
    assert torch.allclose(before[:, product], after[:, product], atol=1e-6)
    assert (before[:, ~product] - after[:, ~product]).abs().amax() > 1e-2
    # without the adapter inputs it is plain cross-attention: product queries do see the tokens
    with torch.no_grad():
        plain = attn(hidden, context), attn(hidden, changed)
    assert (plain[0][:, product] - plain[1][:, product]).abs().amax() > 1e-2


def test_ip_adapter_checkpoint_keys_map_to_processor_names():
    unet = tiny_unet()
    install_adapters(unet, zero_init=True)
    names = list(unet.attn_processors)
    cross = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    state = {f"ip_adapter.{i}.to_k_ip.weight": torch.zeros(1) for i in cross}
    state["image_proj.proj.weight"] = torch.zeros(1)
    mapped = unet_adapter_state(state, names)
    assert set(mapped) == {f"{names[i]}.to_k_ip.weight" for i in cross}
    with pytest.raises(CheckpointError, match="attention layer 999"):
        unet_adapter_state({"ip_adapter.999.to_k_ip.weight": torch.zeros(1)}, names)


def test_adapter_checkpoint_missing_tensor_is_refused(tmp_path):
    built = sd.build("bg_unet", "tiny", Sources()).module.inner.unet
    projection = ImagePromptProjection(32, 32, 4)
    state = adapter_state_dict(built, projection)
    state.pop(next(k for k in state if k.endswith("to_v_ip.weight")))
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor .*to_v_ip"):
        sd.build("bg_unet", "tiny", Sources(checkpoints={"bg_adapter": str(tmp_path / "adapter.safetensors")}))


# ---------------------------------------------------------------------------------------------
# --from-pretrained: diffusers/transformers folders written by save_pretrained
# ---------------------------------------------------------------------------------------------
def save_clip_tokenizer(folder):
    """A real CLIP tokenizer (byte-level BPE, </w> word ends) with a tiny vocabulary."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("o", "t</w>"), ("p", "h"), ("ph", "ot</w>"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)


@pytest.fixture(scope="module")
def pretrained_folders(tmp_path_factory):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1234)  # other weights than the family's seeded random ones
    tiny_unet(9, seed=1234).save_pretrained(root / "unet")
    tiny_unet(4, seed=1234).save_pretrained(root / "unet4")
    AutoencoderKL(**sd.vae_config("tiny")).save_pretrained(root / "vae")
    text_config = sd.clip_text_config("tiny")
    text_config.vocab_size = 600  # >= the tokenizer's 518 tokens
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    CLIPVisionModelWithProjection(sd.clip_vision_config("tiny")).save_pretrained(root / "image_encoder")
    save_clip_tokenizer(root / "tokenizer")
    return root


def pretrained(root, **override):
    paths = {name: str(root / name) for name in ("unet", "vae", "text_encoder", "image_encoder", "tokenizer")}
    return {**paths, **override}


@pytest.fixture(scope="module")
def adapter_checkpoint(tmp_path_factory):
    """A bg_adapter file with non-zero weights in posterrt's layout."""
    torch.manual_seed(99)
    unet = tiny_unet()
    install_adapters(unet, zero_init=False)
    projection = ImagePromptProjection(sd.TINY.vision_projection, 32, 4)
    path = tmp_path_factory.mktemp("adapter") / "bg_adapter.safetensors"
    from safetensors.torch import save_file

    state = adapter_state_dict(unet, projection)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


@pytest.fixture(scope="module")
def pretrained_bundle(tmp_path_factory, pretrained_folders, adapter_checkpoint):
    out = tmp_path_factory.mktemp("sd_pretrained") / "bundle"
    sources = Sources(checkpoints={"bg_adapter": str(adapter_checkpoint[0])}, pretrained=pretrained(pretrained_folders))
    export_bundle("tiny", list(sd.MODELS), out, sources, progress=False)
    return Bundle(out)


def test_pretrained_export_passes_parity(pretrained_bundle):
    for name in sd.MODELS:
        assert pretrained_bundle.manifest["models"][name]["parity"]["passed"], name
    config = pretrained_bundle.config["stable_diffusion"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (516, 517, 517)
    assert config["adapter_weights"] == "checkpoint"
    assert pretrained_bundle.models["clip_text_encoder"].static_dims["clip_vocab_size"] == 600


def test_exported_text_encoder_equals_the_saved_model(pretrained_bundle, pretrained_folders):
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_folders / "tokenizer"))
    ids = tokenizer(["a photo of shoes", "photo"], padding="max_length", max_length=77,
                    return_tensors="np").input_ids.astype(np.int64)
    (got,) = run_onnx(pretrained_bundle.model_path("clip_text_encoder"), {"input_ids": ids})
    with torch.no_grad():
        want = CLIPTextModel.from_pretrained(str(pretrained_folders / "text_encoder")).eval()(
            torch.from_numpy(ids)).last_hidden_state
    assert max_rel(got, want) < RTOL
    # the bundle's tokenizer asset is the folder's tokenizer
    from tokenizers import Tokenizer

    asset = Tokenizer.from_file(str(pretrained_bundle.file(pretrained_bundle.manifest["assets"]["clip_tokenizer"], "t")))
    assert asset.encode("a photo of shoes").ids == tokenizer("a photo of shoes").input_ids


def test_exported_vae_equals_the_saved_model(pretrained_bundle, pretrained_folders):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(pretrained_folders / "vae")).eval()
    image = torch.rand(1, 3, 64, 128) * 2 - 1
    (latent,) = run_onnx(pretrained_bundle.model_path("vae_encoder"), {"image": image})
    (decoded,) = run_onnx(pretrained_bundle.model_path("vae_decoder"), {"latent": latent})
    with torch.no_grad():
        want_latent = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
        want_image = (vae.decode(want_latent / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert max_rel(latent, want_latent) < RTOL and max_rel(decoded, want_image) < RTOL


def test_exported_image_encoder_uses_the_adapter_projection(pretrained_bundle, pretrained_folders, adapter_checkpoint):
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(str(pretrained_folders / "image_encoder")).eval()
    state = adapter_checkpoint[1]
    image = torch.rand(2, 3, 32, 32)
    (got,) = run_onnx(pretrained_bundle.model_path("image_encoder"), {"image": image})
    mean, std = torch.tensor(sd.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(sd.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embeds = vision(pixel_values=(image - mean) / std).image_embeds
        tokens = (embeds @ state["image_proj.proj.weight"].T + state["image_proj.proj.bias"]).view(2, 4, 32)
        want = torch.nn.functional.layer_norm(tokens, (32,), state["image_proj.norm.weight"], state["image_proj.norm.bias"])
    assert max_rel(got, want) < RTOL


def test_exported_unet_with_idle_adapters_equals_the_saved_unet(pretrained_bundle, pretrained_folders):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(pretrained_folders / "unet")).eval()
    inputs = unet_inputs(latent=default_sizes("small")["height"] // 8)
    (got,) = run_onnx(pretrained_bundle.model_path("bg_unet"), inputs)
    with torch.no_grad():
        x = torch.cat([inputs["sample"], inputs["mask"], inputs["masked_image_latents"]], dim=1)
        want = unet(x, inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert max_rel(got, want) < RTOL
    # the loaded (non-zero) image-prompt layers are live in the exported graph
    (with_ip,) = run_onnx(pretrained_bundle.model_path("bg_unet"), {**inputs, "ip_scale": torch.ones(2)})
    assert max_rel(with_ip, got) > 1e-3


def test_pretrained_unet_without_adapter_checkpoint_gets_zero_adapters(pretrained_folders):
    sources = Sources(pretrained=pretrained(pretrained_folders))
    exportable = sd.build("bg_unet", "tiny", sources)
    adapter = {k: v for k, v in exportable.module.state_dict().items() if "_ip." in k}
    assert adapter and all(not v.any() for v in adapter.values())
    assert exportable.config["adapter_weights"] == "zero" and exportable.config["default_ip_scale"] == 0.0


def test_pipeline_folder_root_is_accepted(tmp_path, pretrained_folders):
    """--from-pretrained unet=ROOT finds ROOT/unet, as in a diffusers pipeline folder."""
    sources = Sources(pretrained=pretrained(pretrained_folders, unet=str(pretrained_folders)))
    assert sd.family("tiny", sources).folders["unet"][0].path == pretrained_folders / "unet"


@pytest.mark.parametrize("override, message", [
    ({"unet": "unet4"}, r"unet=.*in_channels is 4; bg_unet needs an inpainting UNet with 9"),
    ({"vae": "missing"}, r"vae=.*folder does not exist; expected a diffusers AutoencoderKL"),
    ({"text_encoder": "empty"}, r"text_encoder=.*no config.json.*CLIPTextModel"),
    ({"image_encoder": "text_encoder"}, r"image_encoder=.*model_type is 'clip_text_model'; expected 'clip_vision_model'"),
    ({"unet": "vae"}, r"unet=.*config is a 'AutoencoderKL'; expected a diffusers UNet2DConditionModel"),
])
def test_unfit_folders_are_refused(pretrained_folders, override, message):
    (pretrained_folders / "empty").mkdir(exist_ok=True)
    paths = pretrained(pretrained_folders, **{k: str(pretrained_folders / v) for k, v in override.items()})
    with pytest.raises(CheckpointError, match=message):
        sd.build("bg_unet", "tiny", Sources(pretrained=paths))


def test_text_encoder_without_tokenizer_is_refused(pretrained_folders):
    paths = pretrained(pretrained_folders)
    del paths["tokenizer"]
    with pytest.raises(CheckpointError, match="needs its tokenizer"):
        sd.build("clip_text_encoder", "tiny", Sources(pretrained=paths))


def test_sizes_that_do_not_fit_together_are_refused(pretrained_folders):
    # a tiny pretrained UNet (cross-attention 32) with the paper preset's random CLIP (768)
    with pytest.raises(CheckpointError, match="hidden size 768 .*cross_attention_dim 32"):
        sd.build("bg_unet", "paper", Sources(pretrained={"unet": str(pretrained_folders / "unet")}))


def test_cli_refuses_a_4_channel_unet_in_one_line(pretrained_folders, tmp_path, capsys):
    from posterrt.runtime.cli import main

    code = main(["export", "--preset", "tiny", "--models", "bg_unet", "--quiet", "--out", str(tmp_path / "b"),
                 "--from-pretrained", f"unet={pretrained_folders / 'unet4'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --from-pretrained unet=") and err.count("\n") == 1
    assert "in_channels is 4" in err
