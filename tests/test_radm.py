"""RADM family: reference pieces against straightforward transcriptions of the public code,
checkpoint loading, and the tiny export with its parity report."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from posterrt.export.bundle_writer import Sources, export_bundle
from posterrt.export.networks import radm
from posterrt.export.networks.radm_backbone import FrozenBatchNorm2d, RADMBackbone
from posterrt.export.networks.radm_config import HeadConfig, RADMConfig
from posterrt.export.networks.radm_head import GeometryRelationModule, RADMHead, VisualTextualAttention
from posterrt.export.networks.radm_roi_align import MultiScaleRoIAlign, assign_levels, roi_align
from posterrt.export.onnx_export import relative_error
from posterrt.export.spec import FP32_RTOL
from posterrt.runtime.errors import CheckpointError, InputError
from posterrt.runtime.samples import default_sizes

RADM_MODELS = ["radm_backbone", "radm_text_encoder", "radm_head"]


# ---------------------------------------------------------------------------------------------
# RoIAlign
# ---------------------------------------------------------------------------------------------
def loop_roi_align(features, rois, batch_index, output_size, spatial_scale, sampling_ratio):
    """Detectron2's ROIAlign CPU kernel (aligned=True), one sample at a time."""
    features = features.double().numpy()
    _, channels, height, width = features.shape
    out = np.zeros((len(rois), channels, output_size, output_size))

    def bilinear(image, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(channels)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1 - ly, 1 - lx
        return (hy * hx * image[:, y_low, x_low] + hy * lx * image[:, y_low, x_high]
                + ly * hx * image[:, y_high, x_low] + ly * lx * image[:, y_high, x_high])

    for r, (box, b) in enumerate(zip(rois.double().numpy(), batch_index.numpy())):
        start_w, start_h = box[0] * spatial_scale - 0.5, box[1] * spatial_scale - 0.5
        bin_w = (box[2] * spatial_scale - 0.5 - start_w) / output_size
        bin_h = (box[3] * spatial_scale - 0.5 - start_h) / output_size
        for ph in range(output_size):
            for pw in range(output_size):
                total = np.zeros(channels)
                for iy in range(sampling_ratio):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    for ix in range(sampling_ratio):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                        total += bilinear(features[b], y, x)
                out[r, :, ph, pw] = total / sampling_ratio ** 2
    return out


def random_rois(generator, count, images, height, width, stride):
    """Boxes inside, across and far outside the map, plus a zero-size one."""
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * stride * 1.4 - 0.2 * stride * width
    size = torch.rand(count, 2, generator=generator) * stride * max(height, width)
    rois = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    rois[0] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # degenerate
    rois[1] = torch.tensor([-50.0, -50.0, -20.0, -20.0]) * stride  # entirely outside
    batch_index = torch.randint(0, images, (count,), generator=generator)
    return rois, batch_index


def test_roi_align_matches_the_detectron2_loop():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 13, generator=generator)
    rois, batch_index = random_rois(generator, 12, 2, 9, 13, stride=4)
    ours = roi_align(features, rois, batch_index, 7, 0.25, 2).double().numpy()
    reference = loop_roi_align(features, rois, batch_index, 7, 0.25, 2)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.abs(reference[2:]).max() > 0.1  # the comparison is not between zeros
    assert np.abs(ours[1]).max() == 0  # a box far outside pools zeros


def test_fpn_level_assignment():
    sizes = torch.tensor([1.0, 56.0, 111.0, 112.5, 223.0, 225.0, 447.0, 449.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], dim=1)
    assert assign_levels(boxes, 2, 5).tolist() == [2, 2, 2, 3, 3, 4, 4, 5, 5]


def test_multi_level_pooling_takes_each_box_from_its_level():
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 4, 64 // 2 ** k, 64 // 2 ** k, generator=generator) for k in range(4)]
    sizes = torch.tensor([20.0, 150.0, 300.0, 600.0, 90.0, 250.0])  # levels 2, 3, 4, 5, 2, 4
    boxes = torch.stack([torch.full_like(sizes, 10.0), torch.full_like(sizes, 5.0), 10 + sizes, 5 + sizes], 1)
    boxes = boxes.reshape(2, 3, 4)
    pooled = MultiScaleRoIAlign((2, 3, 4, 5), 7, 2)(features, boxes)
    flat = boxes.reshape(-1, 4)
    batch_index = torch.tensor([0, 0, 0, 1, 1, 1])
    for row, level in enumerate([2, 3, 4, 5, 2, 4]):
        expected = roi_align(features[level - 2], flat[row:row + 1], batch_index[row:row + 1], 7, 2.0 ** -level, 2)
        torch.testing.assert_close(pooled[row:row + 1], expected)


def test_roi_align_exports_as_onnx_roialign_with_parity(tmp_path):
    pooler = MultiScaleRoIAlign((2, 3, 4, 5), 7, 2)

    class Pool(torch.nn.Module):
        def forward(self, p2, p3, p4, p5, boxes):
            return pooler([p2, p3, p4, p5], boxes)

    def inputs(batch, proposals, side, seed):
        generator = torch.Generator().manual_seed(seed)
        maps = [torch.randn(batch, 3, side // 2 ** k, side // 2 ** k, generator=generator) for k in range(2, 6)]
        corner = torch.rand(batch, proposals, 2, generator=generator) * side
        extent = torch.exp(torch.rand(batch, proposals, 2, generator=generator) * math.log(side))
        return (*maps, torch.cat([corner, corner + extent], dim=-1))

    names = ["p2", "p3", "p4", "p5", "boxes"]
    axes = {n: {0: "b", 2: "h", 3: "w"} for n in names[:4]} | {"boxes": {0: "b", 1: "p"}}
    path = tmp_path / "pool.onnx"
    torch.onnx.export(Pool(), inputs(2, 3, 128, 0), str(path), input_names=names, output_names=["rois"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("RoiAlign") == 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, proposals, side in ((1, 5, 256), (3, 2, 320)):
        args = inputs(batch, proposals, side, seed=side)
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        want = Pool()(*args).numpy()
        assert got.shape == want.shape == (batch * proposals, 3, 7, 7)
        assert relative_error(got, want)[1] < 1e-5


# ---------------------------------------------------------------------------------------------
# GRAM and VTRAM against the public code's formulation
# ---------------------------------------------------------------------------------------------
def official_gram(module, boxes, roi_features):
    """RADM/head.py GeometryRelationAwareModule.forward: a Python loop over images."""
    images, proposals = boxes.shape[:2]
    transformed = module.linear2(roi_features.reshape(images * proposals, -1))
    out = torch.zeros(images * proposals, transformed.shape[1], dtype=transformed.dtype)
    for i in range(images):
        b = boxes[i]
        xywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        rois_repeat = xywh[..., None].repeat(1, 1, proposals)
        floor = torch.tensor(1e-3, dtype=b.dtype)
        gt_w, gt_h = xywh[:, 2].maximum(floor), xywh[:, 3].maximum(floor)
        rel = torch.stack([
            (torch.abs(xywh[:, 0] - rois_repeat[:, 0, :]) / gt_w).maximum(floor),
            (torch.abs(xywh[:, 1] - rois_repeat[:, 1, :]) / gt_h).maximum(floor),
            (rois_repeat[:, 2, :] / gt_w).maximum(floor),
            (rois_repeat[:, 3, :] / gt_h).maximum(floor),
        ], dim=-1).log()
        feat_range = torch.arange(0, module.embed_dim / 8)
        dim_mat = torch.pow(torch.full((1,), module.wave_length), (8.0 / module.embed_dim) * feat_range).reshape(1, 1, 1, -1)
        div = (100.0 * rel).unsqueeze(-1) / dim_mat
        embedding = torch.stack([div.sin(), div.cos()], dim=-1).flatten(2)
        weight = torch.softmax(torch.relu(module.linear(embedding)).squeeze(-1), dim=-1)
        out[i * proposals:(i + 1) * proposals] = torch.mm(weight, transformed[i * proposals:(i + 1) * proposals])
    return out


def test_gram_batched_equals_the_per_image_loop():
    torch.manual_seed(0)
    config = HeadConfig(hidden_dim=8, num_attention_heads=2, gram_embed_dim=16, gram_out_dim=6)
    module = GeometryRelationModule(config).double()
    for parameter in module.parameters():  # larger than the 0.01 init, so the softmax is not flat
        torch.nn.init.normal_(parameter, std=0.5)
    boxes = torch.rand(3, 5, 2, dtype=torch.float64) * 200
    boxes = torch.cat([boxes, boxes + torch.rand(3, 5, 2, dtype=torch.float64) * 150], dim=-1)
    boxes[0, 0, 2] = boxes[0, 0, 0]  # zero width: the 1e-3 clamps matter
    roi_features = torch.randn(15, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        ours, official = module(boxes, roi_features), official_gram(module, boxes, roi_features)
    torch.testing.assert_close(ours, official, rtol=1e-9, atol=1e-9)
    assert official.abs().max() > 0.1


def official_vtram_attention(att, x, l, l_mask, pe, propose_num):
    """RADM/head.py VisualTextualAtten.forward. l: [N, 768, L] as the public code passes it
    (``txt_features.view(N, 768, -1)``), l_mask: [N, L, 1], pe: [N*P, d]."""
    l = l.repeat(propose_num, 1, 1)
    l_mask = l_mask.repeat(propose_num, 1, 1)
    B, HW = x.size(0), x.size(1)
    x = x.permute(0, 2, 1)
    l_mask = l_mask.permute(0, 2, 1)
    query = att.f_query(x).reshape(B, att.channels, -1)
    query = att.linear(torch.cat((query, pe.view(B, att.channels).unsqueeze(2)), dim=2))
    query = query.reshape(B, att.channels, -1).permute(0, 2, 1)
    key = att.f_key(l) * l_mask
    value = att.f_value(l) * l_mask
    n_l = value.size(-1)
    heads, head_dim = att.num_heads, att.channels // att.num_heads
    query = query.reshape(B, HW, heads, head_dim).permute(0, 2, 1, 3)
    key = key.reshape(B, heads, head_dim, n_l)
    value = value.reshape(B, heads, head_dim, n_l)
    sim = (att.channels ** -.5) * torch.matmul(query, key)
    sim = torch.softmax(sim + (1e4 * l_mask.unsqueeze(1) - 1e4), dim=-1)
    out = torch.matmul(sim, value.permute(0, 1, 3, 2)).permute(0, 2, 1, 3).contiguous().reshape(B, HW, att.channels)
    return att.W(out.permute(0, 2, 1)).permute(0, 2, 1)


@pytest.fixture(scope="module")
def vtram_case():
    torch.manual_seed(3)
    text_dim, lines, proposals = 12, 5, 4
    config = HeadConfig(hidden_dim=8, num_attention_heads=2, gram_embed_dim=8)
    # float64: the comparisons below are about formulas, so keep float32 rounding (which the
    # instance norms amplify) out of them
    attention = VisualTextualAttention(config, text_dim).eval().double()
    tokens = torch.randn(2 * proposals, 49, 8, dtype=torch.float64)
    box_token = torch.randn(2 * proposals, 8, dtype=torch.float64)
    text = torch.randn(2, lines, text_dim, dtype=torch.float64)  # [N, lines, text_dim], as radm_head receives it
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1.0, 1, 0, 0, 0]], dtype=torch.float64)
    return attention, tokens, box_token, text, mask, proposals


def channels_first(text, compat):
    head = RADMHead.__new__(RADMHead)  # only the text layout helper is used
    head.config = HeadConfig(hidden_dim=8, num_attention_heads=2, gram_embed_dim=8, text_compat_view=compat)
    return RADMHead.text_channels_first(head, text)


def test_text_compat_view_reproduces_the_public_code_at_batch_1(vtram_case):
    attention, tokens, box_token, text, mask, proposals = vtram_case
    one = slice(0, proposals)
    with torch.no_grad():
        official = official_vtram_attention(attention, tokens[one], text[:1].view(1, text.shape[2], -1),
                                            mask[:1, :, None], box_token[one], proposals)
        compat = attention(tokens[one], box_token[one], channels_first(text[:1], True), mask[:1])
        clean = attention(tokens[one], box_token[one], channels_first(text[:1], False), mask[:1])
        # the clean layout is the public formula fed the transposed features
        official_clean = official_vtram_attention(attention, tokens[one], text[:1].transpose(1, 2),
                                                  mask[:1, :, None], box_token[one], proposals)
    torch.testing.assert_close(compat, official, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(clean, official_clean, rtol=1e-9, atol=1e-9)
    assert (compat - clean).abs().max() > 1e-2  # the switch changes the numbers


@pytest.mark.parametrize("compat", [True, False])
def test_vtram_keeps_each_images_text_to_itself(vtram_case, compat):
    attention, tokens, box_token, text, mask, proposals = vtram_case
    with torch.no_grad():
        batched = attention(tokens, box_token, channels_first(text, compat), mask)
        for image in range(2):
            rows = slice(image * proposals, (image + 1) * proposals)
            alone = attention(tokens[rows], box_token[rows], channels_first(text[image:image + 1], compat),
                              mask[image:image + 1])
            torch.testing.assert_close(batched[rows], alone, rtol=1e-9, atol=1e-9)
        # The public code's batch-interleaved repeat would hand image 0's proposals image 1's text:
        # what the comment on HeadConfig.text_compat_view says is deliberately not reproduced.
        official = official_vtram_attention(attention, tokens, channels_first(text, compat), mask[:, :, None],
                                            box_token, proposals)
    assert (official[:proposals] - batched[:proposals]).abs().max() > 1e-3


def test_padded_lines_do_not_matter(vtram_case):
    attention, tokens, box_token, text, mask, proposals = vtram_case
    changed = text.clone()
    changed[0, 3:] = 100.0  # image 0's padded lines
    # (clean layout only: under the compat view a "line" mixes values of real and padded lines)
    with torch.no_grad():
        a = attention(tokens, box_token, channels_first(text, False), mask)
        b = attention(tokens, box_token, channels_first(changed, False), mask)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Backbone, names, determinism
# ---------------------------------------------------------------------------------------------
def test_frozen_batchnorm_is_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(5)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).normal_()
    frozen.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 4, 4)
    expected = torch.nn.functional.batch_norm(x, frozen.running_mean, frozen.running_var, frozen.weight,
                                              frozen.bias, training=False, eps=1e-5)
    torch.testing.assert_close(frozen(x), expected)


def test_paper_backbone_is_resnet50_with_detectron2_names():
    backbone = RADMBackbone(RADMConfig.paper().backbone)
    state = backbone.state_dict()
    for key in ("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.running_var",
                "backbone.bottom_up.res2.0.shortcut.weight", "backbone.bottom_up.res2.0.shortcut.norm.bias",
                "backbone.bottom_up.res4.5.conv2.weight", "backbone.bottom_up.res5.2.conv3.norm.weight",
                "backbone.fpn_lateral2.weight", "backbone.fpn_output5.bias"):
        assert key in state, key
    assert "backbone.bottom_up.res5.3.conv1.weight" not in state and "pixel_mean" not in state
    assert state["backbone.bottom_up.res5.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["backbone.fpn_lateral5.weight"].shape == (256, 2048, 1, 1)
    # torchvision's resnet50 without fc has 23,508,032 parameters, 53,120 of them BatchNorm affine
    # terms, which FrozenBN holds as buffers
    convs = sum(p.numel() for n, p in backbone.backbone.bottom_up.named_parameters())
    assert convs == 23_508_032 - 53_120
    with torch.no_grad():
        outputs = backbone(torch.rand(1, 3, 128, 192) * 255)
    assert [tuple(o.shape) for o in outputs] == [(1, 256, 128 // s, 192 // s) for s in (4, 8, 16, 32)]


def test_paper_head_sizes_and_names():
    config = RADMConfig.paper()
    with torch.device("meta"):
        head = RADMHead(config.head, text_dim=768, num_classes=4)
    state = head.state_dict()
    assert config.head.fused_dim == 576
    expected = {
        "head.time_mlp.1.weight": (1024, 256), "head.time_mlp.3.weight": (1024, 1024),
        "head.head_series.5.self_attn.in_proj_weight": (768, 256),
        "head.head_series.5.block_time_mlp.1.weight": (512, 1024),
        "head.head_series.0.inst_interact.dynamic_layer.weight": (2 * 256 * 64, 256),
        "head.head_series.0.inst_interact.out_layer.weight": (256, 256 * 49),
        "head.head_series.0.vis_text_att.image_lang_att.f_key.0.weight": (256, 768, 1),
        "head.head_series.0.vis_text_att.image_lang_att.linear.weight": (49, 50),
        "head.head_series.0.linear4.weight": (256, 4),
        "head.head_series.0.GRAM.linear.weight": (1, 64), "head.head_series.0.GRAM.linear2.weight": (64, 256 * 49),
        "head.head_series.0.cls_module.0.weight": (576, 576), "head.head_series.0.reg_module.6.weight": (576, 576),
        "head.head_series.0.class_logits.weight": (4, 576), "head.head_series.0.bboxes_delta.weight": (4, 576),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "head.head_series.6.linear1.weight" not in state and "head.head_series.0.cls_module.3.weight" not in state


@pytest.mark.parametrize("model", RADM_MODELS)
def test_building_twice_gives_the_same_weights(model):
    first = radm.build(model, "tiny", Sources()).module.state_dict()
    second = radm.build(model, "tiny", Sources()).module.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="hidden_dim"):
        RADMConfig(head=HeadConfig(hidden_dim=128))
    with pytest.raises(ValueError, match="num_dynamic"):
        HeadConfig(num_dynamic=3)


def test_misnamed_checkpoint_key_is_refused():
    with pytest.raises(InputError, match="--checkpoint radm="):
        radm.build("radm_head", "tiny", Sources(checkpoints={"radm_head": "x.pth"}))


# ---------------------------------------------------------------------------------------------
# Head behaviour
# ---------------------------------------------------------------------------------------------
def head_inputs(exportable, seed, batch=2):
    sizes = {**default_sizes("opt"), "batch": batch, "proposals": 6, "lines": 3, "height": 256, "width": 320}
    arrays = exportable.inputs(sizes, seed)
    return [torch.from_numpy(arrays[n]) for n in exportable.contract.input_names]


def test_head_results_do_not_depend_on_the_batch():
    exportable = radm.build("radm_head", "tiny", Sources())
    inputs = head_inputs(exportable, seed=5)
    with torch.no_grad():
        batched = exportable.module(*inputs)
        for image in range(2):
            alone = exportable.module(*(t[image:image + 1] for t in inputs))
            for b, a in zip(batched, alone):
                torch.testing.assert_close(b[image:image + 1], a, rtol=1e-4, atol=1e-4)


def test_head_switches_change_the_outputs():
    exportable = radm.build("radm_head", "tiny", Sources())
    inputs = head_inputs(exportable, seed=6, batch=1)
    outputs = {}
    for text_view in (True, False):
        for pool in (True, False):
            module = copy.deepcopy(exportable.module)
            config = dataclasses.replace(RADMConfig.tiny().head, text_compat_view=text_view,
                                         vtram_pool_compat=pool)
            module.config = config
            for stage in module.head.head_series:
                stage.config = config
            with torch.no_grad():
                outputs[text_view, pool] = module(*inputs)[0]
    keys = list(outputs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-5, (a, b)


def test_swapped_image_whwh_normalizes_x_by_the_height():
    exportable = radm.build("radm_head", "tiny", Sources())
    inputs = head_inputs(exportable, seed=7, batch=1)  # a 256 x 320 image
    image_size = inputs[-1]
    clean = copy.deepcopy(exportable.module)
    clean.config = dataclasses.replace(clean.config, swapped_image_whwh=False)
    with torch.no_grad():
        compat = exportable.module(*inputs)[0]
        # (H, W, H, W) is what the clean (W, H, W, H) scale gives for the transposed image size
        swapped = clean(*inputs[:-1], image_size.flip(1))[0]
        plain = clean(*inputs)[0]
    torch.testing.assert_close(compat, swapped)
    assert (compat - plain).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# Export, checkpoints, pretrained text encoder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_radm_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("radm") / "bundle"
    manifest = export_bundle("tiny", RADM_MODELS, out, progress=False)
    return out, manifest


def test_tiny_export_passes_parity_and_records_the_config(tiny_radm_bundle):
    out, manifest = tiny_radm_bundle
    for name in RADM_MODELS:
        entry = manifest["models"][name]
        assert (out / entry["file"]).is_file()
        assert entry["parity"]["passed"] and entry["parity"]["max_rel"] <= FP32_RTOL
        assert len(entry["parity"]["runs"]) == 2
    config = manifest["config"]["radm"]
    assert config["class_names"] == ["logo", "text", "underlay", "embellishment"] and config["num_classes"] == 4
    assert (config["num_proposals"], config["box_scale"], config["num_timesteps"], config["schedule"]) == (100, 2.0, 1000, "cosine")
    assert (config["sampling_steps"], config["ddim_eta"], config["top_k"]) == (1, 1.0, 100)
    assert (config["nms_iou"], config["score_threshold"], config["max_lines"]) == (0.15, 0.25, 20)
    assert config["text_compat_view"] is True and config["swapped_image_whwh"] is True
    assert config["min_size_test"] == 800 and config["max_size_test"] == 1333
    assert manifest["models"]["radm_head"]["static_dims"] == {"fpn_channels": 16, "text_dim": 32, "num_classes": 4}
    head = onnx.load(str(out / "radm_head.onnx"))
    assert [n.op_type for n in head.graph.node].count("RoiAlign") == 4 * RADMConfig.tiny().head.num_stages


def test_tiny_tokenizer_fits_the_text_encoder(tiny_radm_bundle):
    from tokenizers import Tokenizer

    out, manifest = tiny_radm_bundle
    tokenizer = Tokenizer.from_file(str(out / manifest["assets"]["radm_tokenizer"]))
    vocab = manifest["models"]["radm_text_encoder"]["static_dims"]["text_vocab_size"]
    assert tokenizer.get_vocab_size() <= vocab
    assert tokenizer.token_to_id("<pad>") == manifest["config"]["radm"]["text_pad_token_id"]
    ids = tokenizer.encode("限时特惠 Summer sale").ids
    assert ids and max(ids) < vocab


def perturbed_checkpoint(seed=0):
    """The default tiny weights changed by ~10% plus noise, with the public code's training-only
    buffers: what a fine-tuned checkpoint looks like, at a scale the random head stays stable at."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for model in ("radm_backbone", "radm_head"):
        for key, tensor in radm.build(model, "tiny", Sources()).module.state_dict().items():
            noise = torch.rand(tensor.shape, generator=generator) * 0.2 - 0.1
            changed = tensor * (1 + noise)
            if not key.endswith("running_var") and "bboxes_delta" not in key:
                changed = changed + 0.02 * torch.randn(tensor.shape, generator=generator)
            state[key] = changed.contiguous()
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["betas"] = torch.rand(1000)
    return state


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    """The same perturbed weights as a Detectron2 ``.pth`` and as ``.safetensors``."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoints")
    state = perturbed_checkpoint()
    torch.save({"model": state, "iteration": 5}, folder / "model_final.pth")
    save_file(state, str(folder / "model_final.safetensors"))
    return state, folder / "model_final.pth", folder / "model_final.safetensors"


def test_checkpoint_weights_reach_the_onnx_graph(checkpoint_files, tmp_path):
    state, pth, _ = checkpoint_files
    sources = Sources(checkpoints={"radm": str(pth)})
    manifest = export_bundle("tiny", ["radm_head"], tmp_path / "bundle", sources, progress=False)
    assert manifest["models"]["radm_head"]["parity"]["passed"]

    loaded = radm.build("radm_head", "tiny", sources)
    default = radm.build("radm_head", "tiny", Sources())
    inputs = loaded.inputs(default_sizes("other"), seed=11)
    session = ort.InferenceSession(str(tmp_path / "bundle" / "radm_head.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)
    with torch.no_grad():
        want = loaded.module(*(torch.from_numpy(inputs[n]) for n in loaded.contract.input_names))
        before = default.module(*(torch.from_numpy(inputs[n]) for n in loaded.contract.input_names))
    for g, w, b in zip(got, want, before):
        assert relative_error(g, w.numpy())[1] <= FP32_RTOL
        assert relative_error(g, b.numpy())[1] > 1e-3  # the checkpoint changed the numbers


@pytest.mark.parametrize("which", ["pth", "safetensors"])
@pytest.mark.parametrize("model", ["radm_backbone", "radm_head"])
def test_every_checkpoint_tensor_is_loaded(checkpoint_files, which, model):
    state, pth, safetensors = checkpoint_files
    path = pth if which == "pth" else safetensors
    loaded = radm.build(model, "tiny", Sources(checkpoints={"radm": str(path)})).module.state_dict()
    prefix = radm.CHECKPOINT_PREFIX[model]
    assert loaded.keys() == {k for k in state if k.startswith(prefix)}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_checkpoint_with_a_wrong_shape_names_the_tensor(tmp_path):
    state = perturbed_checkpoint()
    state["head.head_series.0.linear4.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"'head\.head_series\.0\.linear4\.weight' has shape \(3, 3\)"):
        radm.build("radm_head", "tiny", Sources(checkpoints={"radm": str(path)}))


def test_checkpoint_missing_a_tensor_or_holding_foreign_ones_is_refused(tmp_path):
    state = perturbed_checkpoint()
    del state["backbone.fpn_output3.bias"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing tensor 'backbone.fpn_output3.bias'"):
        radm.build("radm_backbone", "tiny", Sources(checkpoints={"radm": str(tmp_path / "missing.pth")}))
    state = perturbed_checkpoint()
    state["unet.conv_in.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="unexpected tensor 'unet.conv_in.weight'"):
        radm.build("radm_head", "tiny", Sources(checkpoints={"radm": str(tmp_path / "foreign.pth")}))


def test_missing_and_corrupt_checkpoints_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as missing:
        radm.build("radm_backbone", "tiny", Sources(checkpoints={"radm": str(tmp_path / "nope.pth")}))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read") as broken:
        radm.build("radm_head", "tiny", Sources(checkpoints={"radm": str(corrupt)}))
    for error in (missing, broken):
        assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    """A transformers RoBERTa folder of another width than the tiny preset, with its tokenizer."""
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    from posterrt.export.tokenizers import train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("roberta")
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=400, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=80, type_vocab_size=1,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(300), pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return folder


def test_pretrained_roberta_sets_the_text_width(roberta_folder, tmp_path):
    from transformers import RobertaModel

    sources = Sources(pretrained={"roberta": str(roberta_folder)})
    manifest = export_bundle("tiny", ["radm_text_encoder"], tmp_path / "b", sources, progress=False)
    assert manifest["models"]["radm_text_encoder"]["static_dims"] == {"text_dim": 24, "text_vocab_size": 400}
    assert radm.build("radm_head", "tiny", sources).static_dims["text_dim"] == 24
    assert manifest["config"]["radm"]["text_pad_token_id"] == 0
    reference = RobertaModel.from_pretrained(str(roberta_folder)).eval()
    ids = np.array([[1, 40, 41, 2, 0, 0], [1, 7, 8, 9, 10, 2]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    session = ort.InferenceSession(str(tmp_path / "b" / "radm_text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
    assert relative_error(got, want.numpy())[1] <= FP32_RTOL


def test_bad_pretrained_folder_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        radm.build("radm_text_encoder", "tiny", Sources(pretrained={"roberta": str(tmp_path)}))
