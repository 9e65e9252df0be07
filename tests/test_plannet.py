"""PlanNet export: ONNX parity at two sizes of every dynamic axis, the meaning of masks and mask tokens,
checkpoints (safetensors and .pth) and refusals, the family config and the line tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from posterrt.export.bundle_writer import Sources
from posterrt.export.checkpoints import save_safetensors
from posterrt.export.networks import plannet
from posterrt.export.onnx_export import export_and_check, relative_error
from posterrt.export.spec import FP32_RTOL
from posterrt.runtime.contracts import DYNAMIC_DIMS, get_contract
from posterrt.runtime.errors import CheckpointError
from posterrt.runtime.samples import default_sizes

CONFIG = plannet.PRESETS["tiny"]


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.seed() % 2 ** 31))


def random_tokens(batch, generator, masked_fraction=0.5):
    classes = torch.randint(0, CONFIG.num_class_values, (batch, CONFIG.max_elements, 1), generator=generator)
    coords = torch.randint(0, CONFIG.num_bins, (batch, CONFIG.max_elements, 4), generator=generator)
    tokens = torch.cat([classes, coords], dim=-1)
    masked = torch.rand(tokens.shape, generator=generator) < masked_fraction
    return tokens.masked_fill(masked, CONFIG.mask_token)


def random_memory(batch, tokens, generator):
    memory = torch.randn(batch, tokens, CONFIG.dim, generator=generator)
    mask = (torch.rand(batch, tokens, generator=generator) > 0.3).float()
    mask[:, 0] = 1
    return memory, mask


@pytest.fixture(scope="module")
def tiny():
    return plannet.build_plannet("tiny", Sources())


@pytest.mark.parametrize("model", ["plannet_encoder", "plannet_denoiser"])
def test_onnx_parity_at_two_sizes_of_every_dynamic_axis(model, tmp_path):
    exportable = plannet.build(model, "tiny", Sources())
    entry = export_and_check(exportable, tmp_path)  # raises ParityError beyond 1e-4 relative
    runs = entry["parity"]["runs"]
    assert entry["parity"]["passed"] and len(runs) == 2
    assert set(runs[0]["sizes"]) == set(get_contract(model).input_dims())
    assert all(runs[0]["sizes"][axis] != runs[1]["sizes"][axis] for axis in runs[0]["sizes"])


def test_denoiser_parity_is_scaled_by_the_valid_logits():
    """The -1e4 constants must not set the scale, or a real error would look 1e4 times smaller."""
    exportable = plannet.build("plannet_denoiser", "tiny", Sources())
    inputs = exportable.inputs(default_sizes("other"), seed=int(np.random.default_rng().integers(2 ** 31)))
    with torch.no_grad():
        (want,) = exportable.module(*(torch.from_numpy(inputs[n]) for n in exportable.contract.input_names))
    want = want.numpy()
    keep = exportable.parity_scale_mask("logits", want)
    assert (~keep).sum() == want.shape[0] * CONFIG.max_elements * (CONFIG.num_bins - CONFIG.num_class_values)
    assert np.abs(want[keep]).max() < 100
    got = want.copy()
    got[0, 0, 1, 0] += 0.01  # a visible error in one coordinate logit
    assert relative_error(got, want, keep)[1] > FP32_RTOL
    assert relative_error(got, want)[1] < FP32_RTOL  # what the unmasked scale would have let through


def test_encoder_memory_and_mask(tiny):
    generator = fresh_generator()
    image = torch.rand(2, 3, CONFIG.image_size, CONFIG.image_size, generator=generator)
    ids = torch.randint(0, CONFIG.text_vocab_size, (2, 3, 6), generator=generator)
    mask = torch.zeros(2, 3, 6)
    mask[:, 0, :4] = 1  # line 0: 4 tokens
    mask[0, 1, :1] = 1  # line 1 of sample 0: one token; line 2 is padding everywhere
    with torch.no_grad():
        memory, memory_mask = tiny.encoder(image, ids, mask)
        # padding token ids must not leak into the real lines' tokens
        changed = ids.clone()
        changed[mask == 0] = torch.randint(0, CONFIG.text_vocab_size, (int((mask == 0).sum()),), generator=generator)
        memory2, _ = tiny.encoder(image, changed, mask)
    patches = CONFIG.num_patches
    assert memory.shape == (2, patches + 3, CONFIG.dim) and torch.isfinite(memory).all()
    assert memory_mask[:, :patches].eq(1).all()
    assert memory_mask[:, patches:].tolist() == [[1, 1, 0], [1, 0, 0]]
    real = memory_mask.bool()
    assert torch.allclose(memory[real], memory2[real], atol=1e-6)


def test_denoiser_ignores_masked_memory_and_uses_the_timestep(tiny):
    generator = fresh_generator()
    tokens = random_tokens(2, generator)
    memory, memory_mask = random_memory(2, 9, generator)
    timestep = torch.tensor([10.0, 70.0])
    with torch.no_grad():
        logits = tiny.denoiser(tokens, timestep, memory, memory_mask)
        noisy_padding = memory + (1 - memory_mask)[..., None] * torch.randn(memory.shape, generator=generator) * 10
        same = tiny.denoiser(tokens, timestep, noisy_padding, memory_mask)
        later = tiny.denoiser(tokens, timestep + 20, memory, memory_mask)
    assert logits.shape == (2, CONFIG.max_elements, 5, CONFIG.num_bins)
    assert torch.allclose(logits, same, atol=1e-5)
    assert not torch.allclose(logits, later, atol=1e-3)  # adaptive LayerNorm reads the timestep


def test_class_logits_beyond_the_class_vocabulary_are_masked(tiny):
    generator = fresh_generator()
    memory, memory_mask = random_memory(1, 5, generator)
    with torch.no_grad():
        logits = tiny.denoiser(random_tokens(1, generator), torch.tensor([50.0]), memory, memory_mask)
    valid = CONFIG.num_class_values
    assert logits[..., 0, valid:].eq(plannet.INVALID_LOGIT).all()
    assert logits[..., 0, :valid].gt(plannet.INVALID_LOGIT / 10).all()
    assert logits[..., 1:, :].gt(plannet.INVALID_LOGIT / 10).all()  # coordinates: all K bins are values
    assert logits[..., 0, :].argmax(-1).lt(valid).all()


def test_out_of_vocabulary_class_reads_as_the_mask(tiny):
    generator = fresh_generator()
    memory, memory_mask = random_memory(1, 4, generator)
    tokens = random_tokens(1, generator)
    tokens[0, 3, 0] = CONFIG.mask_token
    other = tokens.clone()
    other[0, 3, 0] = CONFIG.num_class_values + 7  # not a class; must not index out of the table
    with torch.no_grad():
        expected = tiny.denoiser(tokens, torch.tensor([30.0]), memory, memory_mask)
        got = tiny.denoiser(other, torch.tensor([30.0]), memory, memory_mask)
    assert torch.equal(expected, got)


def test_build_is_deterministic_and_both_models_come_from_one_network():
    first = plannet.build_plannet("tiny", Sources()).state_dict()
    encoder = plannet.build("plannet_encoder", "tiny", Sources()).module.inner.state_dict()
    denoiser = plannet.build("plannet_denoiser", "tiny", Sources()).module.inner.state_dict()
    for name, tensor in encoder.items():
        assert torch.equal(tensor, first[f"encoder.{name}"]), name
    for name, tensor in denoiser.items():
        assert torch.equal(tensor, first[f"denoiser.{name}"]), name


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PlanNet of other weights than the preset's, saved as safetensors and as a .pth state dict."""
    folder = tmp_path_factory.mktemp("plannet_ckpt")
    torch.manual_seed(4321)
    model = plannet.PlanNet(CONFIG).eval()
    save_safetensors(model, folder / "plannet.safetensors")
    torch.save({"model": model.state_dict()}, folder / "plannet.pth")  # Detectron2-style wrapper
    return folder, model


@pytest.mark.parametrize("filename", ["plannet.safetensors", "plannet.pth"])
def test_checkpoint_loads_into_both_models(trained, filename, tiny):
    folder, reference = trained
    sources = Sources(checkpoints={"plannet": str(folder / filename)})
    encoder = plannet.build("plannet_encoder", "tiny", sources).module
    denoiser = plannet.build("plannet_denoiser", "tiny", sources).module
    generator = fresh_generator()
    image = torch.rand(1, 3, CONFIG.image_size, CONFIG.image_size, generator=generator)
    ids = torch.randint(0, CONFIG.text_vocab_size, (1, 2, 5), generator=generator)
    mask = torch.ones(1, 2, 5)
    tokens, timestep = random_tokens(1, generator), torch.tensor([40.0])
    with torch.no_grad():
        memory, memory_mask = encoder(image, ids, mask)
        expected_memory, _ = reference.encoder(image, ids, mask)
        (logits,) = denoiser(tokens, timestep, memory, memory_mask)
        expected = reference.denoiser(tokens, timestep, expected_memory, memory_mask)
        random_weights = tiny.denoiser(tokens, timestep, expected_memory, memory_mask)
    assert torch.equal(memory, expected_memory)
    assert torch.equal(logits, expected)
    assert not torch.allclose(logits, random_weights)


def test_wrong_shape_tensor_is_refused_by_name(trained, tmp_path):
    from safetensors.torch import save_file

    folder, model = trained
    state = {n: t.clone() for n, t in model.state_dict().items()}
    state["denoiser.heads.2.weight"] = torch.zeros(CONFIG.num_bins, CONFIG.dim + 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"denoiser\.heads\.2\.weight.*shape"):
        plannet.build("plannet_denoiser", "tiny", Sources(checkpoints={"plannet": str(tmp_path / "bad.safetensors")}))


def test_checkpoint_missing_a_tensor_is_refused(trained, tmp_path):
    folder, model = trained
    state = {n: t for n, t in model.state_dict().items() if n != "encoder.text.position_embed.weight"}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="encoder.text.position_embed.weight"):
        plannet.build("plannet_encoder", "tiny", Sources(checkpoints={"plannet": str(tmp_path / "partial.pth")}))


# ---------------------------------------------------------------------------------------------
# Config and tokenizer
# ---------------------------------------------------------------------------------------------
def test_family_config_matches_the_static_dims():
    encoder = plannet.build("plannet_encoder", "tiny", Sources())
    denoiser = plannet.build("plannet_denoiser", "tiny", Sources())
    config = denoiser.config
    assert config == encoder.config and json.loads(json.dumps(config)) == config
    assert config["class_names"] == ["product", "logo", "text", "underlay", "embellishment"]
    assert config["pad_class"] == 5 and config["attributes"] == ["class", "x", "y", "w", "h"]
    assert config["num_bins"] == denoiser.static_dims["plan_num_bins"] == 128
    assert config["mask_token"] == 128 and config["vocab_size"] == denoiser.static_dims["plan_vocab_size"] == 129
    assert config["num_timesteps"] == 100 and config["schedule"] == "linear"
    assert config["max_elements"] == denoiser.static_dims["max_elements"] == 25
    assert config["image_size"] == encoder.static_dims["plan_image_size"]
    assert config["text_vocab_size"] == encoder.static_dims["text_vocab_size"]
    assert config["max_text_tokens"] == DYNAMIC_DIMS["text_tokens"].max
    paper = plannet.PRESETS["paper"]
    assert (paper.dim, paper.heads, paper.denoiser_layers, paper.image_size, paper.patch_size) == (512, 8, 4, 224, 16)
    assert paper.num_patches + DYNAMIC_DIMS["lines"].max <= DYNAMIC_DIMS["memory_tokens"].max


def test_write_assets_trains_a_tokenizer_within_the_model_vocabulary(tmp_path):
    assets = plannet.write_assets("tiny", Sources(), tmp_path)
    assert assets == {"plannet_tokenizer": "tokenizers/plannet.json"}
    tokenizer = Tokenizer.from_file(str(tmp_path / assets["plannet_tokenizer"]))
    assert tokenizer.get_vocab_size() <= CONFIG.text_vocab_size
    ids = tokenizer.encode("限时特惠 Summer sale 50% off").ids
    assert ids and max(ids) < CONFIG.text_vocab_size


def test_too_large_pretrained_tokenizer_is_refused(tmp_path):
    from posterrt.export.tokenizers import train_tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "big_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(400)).save_pretrained(folder)
    assert train_tiny_tokenizer(400).get_vocab_size() > CONFIG.text_vocab_size
    with pytest.raises(CheckpointError, match="text_vocab_size 320"):
        plannet.write_assets("tiny", Sources(pretrained={"plannet_tokenizer": str(folder)}), tmp_path / "out")
