"""RenderNet export: the prologue/step split equals diffusers' ControlNet + UNet run whole, ONNX parity,
pretrained diffusers folders and SFM checkpoints, refusal of mismatched folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from posterrt.export.bundle_writer import Sources, export_bundle
from posterrt.export.checkpoints import save_safetensors
from posterrt.export.networks import rendernet
from posterrt.export.onnx_export import export_and_check
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.contracts import get_contract
from posterrt.runtime.errors import CheckpointError, InputError

#: The split runs the very same diffusers submodules in the same order as ControlNetModel.forward, so
#: in fp32 only summation order inside kernels may differ: 1e-5 of the output's scale.
SPLIT_RTOL = 1e-5


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def random_step_inputs(controlnet, unet, batch=2, latent=(32, 40), tokens=77, seed=None):
    """Fresh random inputs (seed from the OS unless given): latents, float timesteps, context, per-sample scales."""
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2 ** 31))
    sample = torch.randn(batch, unet.config.in_channels, *latent, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator).float()
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    scale = torch.rand(batch, generator=generator) * 2.0  # different per sample on purpose
    return sample, timestep, context, scale, generator


def diffusers_reference(controlnet, unet, sample, timestep, context, cond_image, scale):
    """ControlNetModel then UNet2DConditionModel run whole, one sample at a time (diffusers takes one float scale)."""
    outputs = []
    for i in range(sample.shape[0]):
        down, mid = controlnet(sample[i:i + 1], timestep[i:i + 1], context[i:i + 1], controlnet_cond=cond_image[i:i + 1],
                               conditioning_scale=float(scale[i]), return_dict=False)
        outputs.append(unet(sample[i:i + 1], timestep[i:i + 1], context[i:i + 1], down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0])
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def tiny_parts():
    sources = Sources()
    return rendernet.build_controlnet("tiny", sources), rendernet.build_unet("tiny", sources)


def test_render_unet_equals_controlnet_then_unet_whole(tiny_parts):
    controlnet, unet = tiny_parts
    fused = rendernet.build("render_unet", "tiny", Sources()).module
    sample, timestep, context, scale, generator = random_step_inputs(controlnet, unet)
    cond_image = torch.rand(sample.shape[0], 3, sample.shape[2] * 8, sample.shape[3] * 8, generator=generator)
    with torch.no_grad():
        embedding = controlnet.controlnet_cond_embedding(cond_image)
        (ours,) = fused(sample, timestep, context, embedding, scale)
        expected = diffusers_reference(controlnet, unet, sample, timestep, context, cond_image, scale)
        without_control = unet(sample, timestep, context, return_dict=False)[0]
    assert relative(ours, expected) <= SPLIT_RTOL
    # the control path really contributes (random weights in the zero convolutions), so the test can fail
    assert relative(without_control, expected) > 1e-2


def test_condition_then_unet_equals_diffusers_on_the_sfm_image(tiny_parts):
    controlnet, unet = tiny_parts
    sources = Sources()
    condition = rendernet.build("render_condition", "tiny", sources).module
    fused = rendernet.build("render_unet", "tiny", sources).module
    sample, timestep, context, scale, generator = random_step_inputs(controlnet, unet, latent=(40, 32))
    height, width = sample.shape[2] * 8, sample.shape[3] * 8
    masks = (torch.rand(sample.shape[0], len(rendernet.LAYOUT_CHANNELS), height, width, generator=generator) > 0.5).float()
    product = torch.rand(sample.shape[0], 3, height, width, generator=generator)
    sfm = rendernet.build_sfm("tiny", sources, len(rendernet.LAYOUT_CHANNELS), 3)
    with torch.no_grad():
        (embedding,) = condition(masks, product)
        (ours,) = fused(sample, timestep, context, embedding, scale)
        expected = diffusers_reference(controlnet, unet, sample, timestep, context, sfm(masks, product), scale)
    assert embedding.shape == (sample.shape[0], 16, sample.shape[2], sample.shape[3])
    assert relative(ours, expected) <= SPLIT_RTOL


def test_both_graphs_share_the_controlnet_weights(tiny_parts):
    controlnet, _ = tiny_parts
    condition = rendernet.build("render_condition", "tiny", Sources()).module.inner
    fused = rendernet.build("render_unet", "tiny", Sources()).module.inner
    reference = controlnet.state_dict()
    for name, tensor in condition.cond_embedding.state_dict().items():
        assert torch.equal(tensor, reference[f"controlnet_cond_embedding.{name}"]), name
    for name, tensor in fused.trunk.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_coordinate_grid_spans_minus_one_to_one():
    grid = rendernet.coordinate_grid(torch.zeros(2, 5, 4, 8))
    assert grid.shape == (2, 2, 4, 8)
    assert torch.allclose(grid[0, 0, 0], (torch.arange(8) + 0.5) / 4 - 1)  # x varies along width
    assert torch.allclose(grid[1, 1, :, 0], (torch.arange(4) + 0.5) / 2 - 1)  # y along height
    assert grid.min() > -1 and grid.max() < 1


@pytest.mark.parametrize("model", ["render_condition", "render_unet"])
def test_onnx_parity_tiny(model, tmp_path):
    exportable = rendernet.build(model, "tiny", Sources())
    entry = export_and_check(exportable, tmp_path)  # raises ParityError beyond FP32_RTOL, at two sizes per axis
    assert entry["parity"]["passed"] and len(entry["parity"]["runs"]) == 2
    sizes = [run["sizes"] for run in entry["parity"]["runs"]]
    assert all(sizes[0][axis] != sizes[1][axis] for axis in sizes[0])


def test_config_drives_a_diffusers_scheduler_and_matches_the_contract():
    from diffusers import DDIMScheduler

    exportable = rendernet.build("render_condition", "tiny", Sources())
    config = exportable.config
    assert config["layout_channels"] == ["logo", "text", "underlay", "embellishment", "product"]
    assert exportable.static_dims["layout_channels"] == len(config["layout_channels"])
    assert config["control_channels"] == exportable.static_dims["control_channels"] == 16
    assert config["default_control_scale"] == 1.0
    scheduler = DDIMScheduler.from_config(config["scheduler"])
    scheduler.set_timesteps(50)
    assert int(scheduler.timesteps[0]) == 981 and int(scheduler.timesteps[-1]) == 1  # SD 1.5 "leading" + offset 1


# ---------------------------------------------------------------------------------------------
# Real weights: diffusers folders and an SFM checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_folders(tmp_path_factory):
    """Tiny UNet and ControlNet of another seed than the preset's, saved with save_pretrained."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("render_pretrained")
    preset = rendernet.PRESETS["tiny"]
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(**preset.unet_config())
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    rendernet._randomize_zero_convs(controlnet, torch.Generator().manual_seed(99))
    unet.save_pretrained(root / "unet")
    controlnet.save_pretrained(root / "controlnet")
    sfm = rendernet.SpatialFusion(len(rendernet.LAYOUT_CHANNELS), preset.sfm_hidden_channels, 3)
    save_safetensors(sfm, root / "sfm.safetensors")
    return root, unet.eval(), controlnet.eval(), sfm.eval()


def test_export_from_pretrained_folders_uses_their_weights(pretrained_folders, tmp_path):
    root, unet, controlnet, sfm = pretrained_folders
    sources = Sources(checkpoints={"sfm": str(root / "sfm.safetensors")},
                      pretrained={"render_unet": str(root / "unet"), "controlnet": str(root / "controlnet")})
    manifest = export_bundle("tiny", ["render_condition", "render_unet"], tmp_path / "bundle", sources, progress=False)
    assert all(manifest["models"][m]["parity"]["passed"] for m in ("render_condition", "render_unet"))
    assert Bundle(tmp_path / "bundle").config["rendernet"]["control_channels"] == 16

    condition = rendernet.build("render_condition", "tiny", sources).module
    fused = rendernet.build("render_unet", "tiny", sources).module
    sample, timestep, context, scale, generator = random_step_inputs(controlnet, unet, batch=1)
    masks = torch.rand(1, len(rendernet.LAYOUT_CHANNELS), 256, 320, generator=generator)
    product = torch.rand(1, 3, 256, 320, generator=generator)
    with torch.no_grad():
        (embedding,) = condition(masks, product)
        (ours,) = fused(sample, timestep, context, embedding, scale)
        expected = diffusers_reference(controlnet, unet, sample, timestep, context, sfm(masks, product), scale)
    assert relative(ours, expected) <= SPLIT_RTOL


def test_sfm_checkpoint_of_wrong_shape_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    sfm = rendernet.SpatialFusion(len(rendernet.LAYOUT_CHANNELS), 8, 3)
    state = {n: t.clone() for n, t in sfm.state_dict().items()}
    state["conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="conv_out.weight"):
        rendernet.build("render_condition", "tiny", Sources(checkpoints={"sfm": str(tmp_path / "bad.safetensors")}))


def test_controlnet_of_another_context_size_is_refused(pretrained_folders, tmp_path):
    from diffusers import ControlNetModel

    root, *_ = pretrained_folders
    config = rendernet.PRESETS["tiny"].controlnet_config()
    ControlNetModel(**{**config, "cross_attention_dim": 24}).save_pretrained(tmp_path / "controlnet")
    sources = Sources(pretrained={"render_unet": str(root / "unet"), "controlnet": str(tmp_path / "controlnet")})
    with pytest.raises(CheckpointError, match="cross_attention_dim=24"):
        rendernet.build("render_unet", "tiny", sources)


def test_inpainting_unet_is_refused(pretrained_folders, tmp_path):
    from diffusers import UNet2DConditionModel

    root, *_ = pretrained_folders
    config = rendernet.PRESETS["tiny"].unet_config()
    UNet2DConditionModel(**{**config, "in_channels": 9}).save_pretrained(tmp_path / "unet9")
    sources = Sources(pretrained={"render_unet": str(tmp_path / "unet9"), "controlnet": str(root / "controlnet")})
    with pytest.raises(CheckpointError, match="in_channels=9"):
        rendernet.build("render_unet", "tiny", sources)


def test_folder_of_another_class_or_missing_is_refused(pretrained_folders, tmp_path):
    root, *_ = pretrained_folders
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel"):
        rendernet.build("render_condition", "tiny", Sources(pretrained={"controlnet": str(root / "unet")}))
    with pytest.raises(CheckpointError, match="no config.json"):
        rendernet.build("render_condition", "tiny", Sources(pretrained={"controlnet": str(tmp_path / "nowhere")}))


def test_unet_without_its_controlnet_is_refused(pretrained_folders):
    root, *_ = pretrained_folders
    with pytest.raises(InputError, match="come together"):
        rendernet.build("render_unet", "tiny", Sources(pretrained={"render_unet": str(root / "unet")}))


def test_static_dims_resolve_the_contracts():
    for model in ("render_condition", "render_unet"):
        exportable = rendernet.build(model, "tiny", Sources())
        contract = get_contract(model).resolve(exportable.static_dims)
        inputs = exportable.inputs({"batch": 1, "cfg_batch": 2, "height": 256, "width": 320}, seed=0)
        assert set(inputs) == set(contract.input_names)
        assert np.all(np.isfinite(next(iter(inputs.values()))))


def test_scattered_external_data_is_gathered_into_one_file(tmp_path):
    """Paper render_unet is past 2 GB, where the tracer writes one file per tensor under a sanitized
    name ("onnx::MatMul_7" -> "onnx__MatMul_7"): the bundle must end with one .onnx.data and no strays."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from posterrt.export.onnx_export import gather_external_data

    rng = np.random.default_rng()
    weights = {"onnx::MatMul_7": rng.standard_normal((8, 64)).astype(np.float32),
               "unet.conv_in.weight": rng.standard_normal((64, 3)).astype(np.float32)}  # 2 KB and 768 B
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["h"]),
         helper.make_node("MatMul", ["h", "unet.conv_in.weight"], ["y"])], "scattered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()])
    path = tmp_path / "render_unet.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3  # the model and one file per tensor

    assert gather_external_data(path) == ["render_unet.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render_unet.onnx", "render_unet.onnx.data"]
    assert (tmp_path / "render_unet.onnx.data").stat().st_mode == path.stat().st_mode
    x = rng.standard_normal((2, 8)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weights["onnx::MatMul_7"] @ weights["unet.conv_in.weight"], rtol=1e-4, atol=1e-4)
    assert gather_external_data(path) == ["render_unet.onnx.data"]  # already gathered: unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render_unet.onnx", "render_unet.onnx.data"]
