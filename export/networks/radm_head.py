"""RADM's per-step head: DiffusionDet's cascade of dynamic RCNN heads with RADM's VTRAM and GRAM.

Module names mirror the public code (``RADM/head.py`` of ``liuan0803/RADM``): ``head.time_mlp.*``,
``head.head_series.{k}.self_attn``, ``.inst_interact``, ``.vis_text_att``, ``.GRAM``, ``.linear4``,
``.cls_module``, ``.reg_module``, ``.class_logits``, ``.bboxes_delta``, so a checkpoint saved by that
code loads by name. The computation is the same, batched: the public code loops over images in
Python (GRAM) and relies on Detectron2's ``ROIPooler``; here every step is a tensor op over the
whole batch, which is what ONNX export and Triton batching need.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .radm_backbone import FPN_LEVELS
from .radm_config import HeadConfig
from .radm_roi_align import MultiScaleRoIAlign

#: Attention logit added at padded text lines (the public code's ``1e4 * mask - 1e4``).
MASKED_LOGIT = -1.0e4


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half = self.dim // 2
        frequencies = torch.exp(torch.arange(half, device=time.device) * -(math.log(10000) / (half - 1)))
        angles = time[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ProposalSelfAttention(nn.Module):
    """Multi-head self-attention among the proposals of each image, with ``nn.MultiheadAttention``'s
    parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so checkpoints load.

    Not ``nn.MultiheadAttention`` itself: its forward computes ``batch * heads`` in Python, which the
    ONNX tracer freezes into the graph, so the export would only run at the traced batch size."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        """x [N, P, d] -> [N, P, d]."""
        head_dim = x.shape[-1] // self.num_heads
        query, key, value = (t.unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)  # [N, h, P, hd]
                             for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        weights = torch.matmul(query * head_dim ** -0.5, key.transpose(2, 3)).softmax(dim=-1)
        return self.out_proj(torch.matmul(weights, value).transpose(1, 2).flatten(2))


class DynamicConv(nn.Module):
    """Sparse R-CNN's instance interaction: each proposal's feature generates two 1x1 convs that
    are applied to its own RoI tokens."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.hidden_dim = config.hidden_dim
        self.dim_dynamic = config.dim_dynamic
        self.num_params = self.hidden_dim * self.dim_dynamic
        self.dynamic_layer = nn.Linear(self.hidden_dim, config.num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(self.dim_dynamic)
        self.norm2 = nn.LayerNorm(self.hidden_dim)
        self.out_layer = nn.Linear(self.hidden_dim * config.pooler_resolution ** 2, self.hidden_dim)
        self.norm3 = nn.LayerNorm(self.hidden_dim)

    def forward(self, proposal_features, roi_tokens):
        """proposal_features [R, d]; roi_tokens [R, s*s, d] -> [R, d]."""
        parameters = self.dynamic_layer(proposal_features)
        param1 = parameters[:, :self.num_params].reshape(-1, self.hidden_dim, self.dim_dynamic)
        param2 = parameters[:, self.num_params:].reshape(-1, self.dim_dynamic, self.hidden_dim)
        features = F.relu(self.norm1(torch.bmm(roi_tokens, param1)))
        features = F.relu(self.norm2(torch.bmm(features, param2)))
        return F.relu(self.norm3(self.out_layer(features.flatten(1))))


class VisualTextualAttention(nn.Module):
    """VTRAM's cross-attention (after LAVT): queries are a proposal's RoI tokens mixed with its box
    token, keys/values are the poster's text lines."""

    def __init__(self, config: HeadConfig, text_dim: int):
        super().__init__()
        d = config.hidden_dim
        tokens = config.pooler_resolution ** 2
        self.channels = d
        self.num_heads = config.vtram_heads
        self.linear = nn.Linear(tokens + 1, tokens)  # 49 RoI tokens + 1 box token -> 49 tokens
        self.f_key = nn.Sequential(nn.Conv1d(text_dim, d, 1))
        self.f_query = nn.Sequential(nn.Conv1d(d, d, 1), nn.InstanceNorm1d(d))
        self.f_value = nn.Sequential(nn.Conv1d(text_dim, d, 1))
        self.W = nn.Sequential(nn.Conv1d(d, d, 1), nn.InstanceNorm1d(d))

    def forward(self, roi_tokens, box_token, text, text_mask):
        """roi_tokens [N*P, T, d]; box_token [N*P, d]; text [N, text_dim, L] (channels first);
        text_mask [N, L] -> [N*P, T, d]."""
        tokens, d = roi_tokens.shape[1:]
        heads, head_dim = self.num_heads, d // self.num_heads
        query = self.f_query(roi_tokens.transpose(1, 2))  # [R, d, T]
        query = self.linear(torch.cat((query, box_token[:, :, None]), dim=2)).transpose(1, 2)  # [R, T, d]
        # Keys/values are per image: computed once and broadcast over its proposals, where the
        # public code repeats the text for every proposal first (same numbers, P times less work).
        mask = text_mask[:, None, :]  # [N, 1, L]
        key = self.f_key(text) * mask
        value = self.f_value(text) * mask
        images, lines = text.shape[0], text.shape[2]
        query = query.reshape(images, -1, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)  # [N, P, h, T, hd]
        key = key.reshape(images, 1, heads, head_dim, lines)
        value = value.reshape(images, 1, heads, head_dim, lines).transpose(3, 4)
        # The public code scales by the full key width, not the per-head width: kept for its checkpoints.
        logits = torch.matmul(query, key) * d ** -0.5  # [N, P, h, T, L]
        logits = logits + (1.0 - text_mask[:, None, None, None, :]) * MASKED_LOGIT
        out = torch.matmul(logits.softmax(dim=-1), value)  # [N, P, h, T, hd]
        out = out.permute(0, 1, 3, 2, 4).reshape(-1, tokens, d)
        return self.W(out.transpose(1, 2)).transpose(1, 2)


class VisualTextualRelationModule(nn.Module):
    """VTRAM: text-attended features gate the projected visual tokens."""

    def __init__(self, config: HeadConfig, text_dim: int):
        super().__init__()
        d = config.hidden_dim
        self.vis_project = nn.Sequential(nn.Conv1d(d, d, 1), nn.GELU(), nn.Dropout(0.0))
        self.image_lang_att = VisualTextualAttention(config, text_dim)
        self.project_mm = nn.Sequential(nn.Conv1d(d, d, 1), nn.GELU(), nn.Dropout(0.0))

    def forward(self, roi_tokens, box_token, text, text_mask):
        visual = self.vis_project(roi_tokens.transpose(1, 2))  # [R, d, T]
        language = self.image_lang_att(roi_tokens, box_token, text, text_mask).transpose(1, 2)
        return self.project_mm(visual * language).transpose(1, 2)  # [R, T, d]


class GeometryRelationModule(nn.Module):
    """GRAM: attention over the proposals of one image weighted by their relative geometry
    (Relation Networks' sin/cos embedding of log-ratios), aggregating projected RoI features.

    The public code loops over the images of a batch in Python; this is the same computation for
    all images at once ([N, P, P] pair tensors)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.embed_dim = config.gram_embed_dim
        self.wave_length = config.gram_wave_length
        self.linear = nn.Linear(self.embed_dim, 1)
        self.linear2 = nn.Linear(config.hidden_dim * config.pooler_resolution ** 2, config.gram_out_dim)
        for layer in (self.linear, self.linear2):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)

    def relative_geometry(self, boxes):
        """boxes [N, P, 4] x1y1x2y2 -> [N, P, P, 4]: log of |dx|/w_j, |dy|/h_j, w_i/w_j, h_i/h_j."""
        cx = (boxes[..., 0] + boxes[..., 2]) / 2
        cy = (boxes[..., 1] + boxes[..., 3]) / 2
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        w_j = w.clamp(min=1e-3)[:, None, :]
        h_j = h.clamp(min=1e-3)[:, None, :]
        relative = torch.stack([
            (cx[:, None, :] - cx[:, :, None]).abs() / w_j,
            (cy[:, None, :] - cy[:, :, None]).abs() / h_j,
            w[:, :, None] / w_j,
            h[:, :, None] / h_j,
        ], dim=-1)
        return relative.clamp(min=1e-3).log()

    def position_embedding(self, relative):
        """[N, P, P, 4] -> [N, P, P, embed_dim]: for each coordinate, sin/cos at embed_dim/8 wavelengths."""
        exponents = torch.arange(self.embed_dim // 8, device=relative.device) * (8.0 / self.embed_dim)
        wavelengths = torch.pow(torch.full((1,), self.wave_length, device=relative.device), exponents)
        angles = (100.0 * relative)[..., None] / wavelengths  # [N, P, P, 4, embed_dim/8]
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(3)

    def forward(self, boxes, roi_features):
        """boxes [N, P, 4]; roi_features [N*P, d, s, s] -> [N*P, gram_out_dim]."""
        weights = F.relu(self.linear(self.position_embedding(self.relative_geometry(boxes)))).squeeze(-1)
        weights = weights.softmax(dim=-1)  # [N, P(i), P(j)]
        values = self.linear2(roi_features.flatten(1)).reshape(boxes.shape[0], boxes.shape[1], -1)
        return torch.matmul(weights, values).flatten(0, 1)


class RCNNHead(nn.Module):
    """One stage of the cascade."""

    def __init__(self, config: HeadConfig, text_dim: int, num_classes: int):
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.d_model = d
        self.text_dim = text_dim
        self.self_attn = ProposalSelfAttention(d, config.num_attention_heads)
        self.inst_interact = DynamicConv(config)
        self.linear1 = nn.Linear(d, config.dim_feedforward)
        self.dropout = nn.Dropout(0.0)
        self.linear2 = nn.Linear(config.dim_feedforward, d)
        if config.with_vtram:
            self.vis_text_att = VisualTextualRelationModule(config, text_dim)
            self.linear4 = nn.Linear(4, d)  # normalized box -> VTRAM's box token
        if config.with_gram:
            self.GRAM = GeometryRelationModule(config)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.block_time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(4 * d, 2 * d))
        fused = config.fused_dim
        self.cls_module = nn.ModuleList(_branch(fused, config.num_cls_layers))
        self.reg_module = nn.ModuleList(_branch(fused, config.num_reg_layers))
        self.class_logits = nn.Linear(fused, num_classes)  # focal loss: no background class
        self.bboxes_delta = nn.Linear(fused, 4)

    def forward(self, features, boxes, norm_boxes, text, text_mask, proposal_features, pooler, time_emb):
        """boxes [N, P, 4] pixels; norm_boxes [N, P, 4] in 0..1; text [N, text_dim, L];
        proposal_features [N*P, d] or None (first stage); time_emb [N, 4d].
        Returns class logits [N, P, K], boxes [N, P, 4], object features [N*P, d]."""
        images, proposals = boxes.shape[:2]
        d = self.d_model
        roi_features = pooler(features, boxes)  # [N*P, d, s, s]
        if proposal_features is None:
            proposal_features = roi_features.flatten(2).mean(-1)
        roi_tokens = roi_features.flatten(2).transpose(1, 2)  # [N*P, s*s, d]
        fused = []
        if self.config.with_gram:
            fused.append(self.GRAM(boxes, roi_features))
        if self.config.with_vtram:
            mixed = self.vis_text_att(roi_tokens, self.linear4(norm_boxes).flatten(0, 1), text, text_mask)
            if self.config.vtram_pool_compat:
                # the public code's `reshape(N*P, d, -1).mean(-1)` of the token-major [N*P, T, d]
                vtram = mixed.reshape(-1, d, mixed.shape[1]).mean(-1)
            else:
                vtram = mixed.mean(1)

        # (reshapes use -1, never a product of sizes: the tracer would freeze that product)
        sequence = proposal_features.reshape(images, proposals, d)
        objects = self.norm1(sequence + self.self_attn(sequence)).reshape(-1, d)
        objects = self.norm2(objects + self.inst_interact(objects, roi_tokens))
        objects = self.norm3(objects + self.linear2(self.dropout(F.relu(self.linear1(objects)))))

        scale, shift = self.block_time_mlp(time_emb).chunk(2, dim=1)  # [N, d] each, per image
        modulated = objects.reshape(images, proposals, d) * (scale[:, None] + 1) + shift[:, None]
        fused.append(modulated.flatten(0, 1))
        if self.config.with_vtram:
            fused.append(vtram)
        fused = torch.cat(fused, dim=1)  # [GRAM | object | VTRAM]

        class_features, box_features = fused, fused
        for layer in self.cls_module:
            class_features = layer(class_features)
        for layer in self.reg_module:
            box_features = layer(box_features)
        class_logits = self.class_logits(class_features)
        pred_boxes = self.apply_deltas(self.bboxes_delta(box_features), boxes.reshape(-1, 4))
        return (class_logits.reshape(images, proposals, -1), pred_boxes.reshape(images, proposals, 4), objects)

    def apply_deltas(self, deltas, boxes):
        """Detectron2's Box2BoxTransform.apply_deltas with weights (2, 2, 1, 1) and a clamped exp."""
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.config.bbox_weights
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.config.scale_clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.config.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                            pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=1)


def _branch(width: int, layers: int) -> list[nn.Module]:
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(width, width, bias=False), nn.LayerNorm(width), nn.ReLU(inplace=True)]
    return modules


class DynamicHead(nn.Module):
    """Time embedding + the cascade; each stage refines the previous stage's (detached) boxes."""

    def __init__(self, config: HeadConfig, text_dim: int, num_classes: int):
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.box_pooler = MultiScaleRoIAlign(FPN_LEVELS, config.pooler_resolution, config.sampling_ratio)
        stage = RCNNHead(config, text_dim, num_classes)
        self.head_series = nn.ModuleList(copy.deepcopy(stage) for _ in range(config.num_stages))
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(d), nn.Linear(d, 4 * d), nn.GELU(),
                                      nn.Linear(4 * d, 4 * d))
        self._reset_parameters(num_classes)

    def _reset_parameters(self, num_classes: int):
        # The public code's init: Xavier for every matrix, and the focal-loss prior on the class
        # bias. (Its rule matches parameters by `shape[-1] == num_classes`, which with 4 classes
        # also hits linear4 and bboxes_delta; only the class bias is meant, so only it is set here.
        # Irrelevant for loaded checkpoints; random weights just stay non-degenerate.)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        bias = -math.log((1 - self.config.prior_prob) / self.config.prior_prob)
        for stage in self.head_series:
            nn.init.constant_(stage.class_logits.bias, bias)
            # Box deltas start near zero, as Detectron2 initializes its box regressors (std 0.001)
            # and as a trained cascade behaves (each stage refines, none jumps). With Xavier here a
            # random head rescales boxes by up to e^2 per stage, so the next stage pools far-away
            # boxes and float32 rounding in one stage's boxes becomes a visible change in the next
            # stage's RoI features: torch itself then differs from its own float64 run by 1e-4.
            nn.init.normal_(stage.bboxes_delta.weight, std=0.001)
            nn.init.zeros_(stage.bboxes_delta.bias)

    def forward(self, features, boxes, norm_boxes, text, text_mask, timestep):
        """Returns the last stage's class logits [N, P, K] and boxes [N, P, 4]."""
        time_emb = self.time_mlp(timestep)
        proposal_features = None
        for stage in self.head_series:
            class_logits, pred_boxes, proposal_features = stage(
                features, boxes, norm_boxes, text, text_mask, proposal_features, self.box_pooler, time_emb)
            boxes = pred_boxes.detach()
        return class_logits, pred_boxes


class RADMHead(nn.Module):
    """The served ``radm_head``: inputs and outputs in contract order."""

    def __init__(self, config: HeadConfig, text_dim: int, num_classes: int):
        super().__init__()
        self.config = config
        self.head = DynamicHead(config, text_dim, num_classes)

    def text_channels_first(self, text_features):
        """[N, L, text_dim] -> [N, text_dim, L], the layout VTRAM's Conv1d reads.

        ``text_compat_view`` reproduces the public code's ``view(N, 768, -1)`` (see HeadConfig)."""
        if self.config.text_compat_view:
            return text_features.reshape(text_features.shape[0], text_features.shape[2], -1)
        return text_features.transpose(1, 2)

    def forward(self, p2, p3, p4, p5, boxes, timestep, text_features, text_mask, image_size):
        height, width = image_size[:, 0], image_size[:, 1]
        if self.config.swapped_image_whwh:  # the public code's (H, W, H, W) scale, see HeadConfig
            whwh = torch.stack([height, width, height, width], dim=1)[:, None, :]
        else:
            whwh = torch.stack([width, height, width, height], dim=1)[:, None, :]
        norm_boxes = boxes / whwh  # VTRAM's box token reads boxes normalized to the image
        text = self.text_channels_first(text_features)
        return self.head([p2, p3, p4, p5], boxes, norm_boxes, text, text_mask, timestep)
