import numpy as np
import pytest

from posterrt.runtime.contracts import (CONTRACTS, DYNAMIC_DIMS, MODEL_NAMES, STEP, dim_range, get_contract,
                                        validate_inputs)
from posterrt.runtime.errors import ContractError
from posterrt.runtime.samples import default_sizes, sample_inputs

STATIC = {"fpn_channels": 8, "text_dim": 16, "num_classes": 4, "text_vocab_size": 50}


def test_all_sixteen_served_models_are_described():
    assert len(MODEL_NAMES) == 16  # twelve networks, and the two cached-step graphs of each UNet
    for contract in CONTRACTS.values():
        assert contract.stage in ("layout", "background", "render")
        for tensor in contract.inputs + contract.outputs:
            assert tensor.shape[0] in ("batch", "cfg_batch", "text_rows"), (contract.name, tensor.name)


def test_step_models_are_the_denoisers():
    assert {c.name for c in CONTRACTS.values() if c.role == STEP} == {
        "radm_head", "plannet_denoiser", "bg_unet", "render_unet",
        "bg_unet_deep", "bg_unet_shallow", "render_unet_deep", "render_unet_shallow"}


def test_derived_ranges_follow_their_base():
    assert dim_range("height/4").min == DYNAMIC_DIMS["height"].min // 4
    assert dim_range("height/32").max == DYNAMIC_DIMS["height"].max // 32
    assert dim_range("fpn_channels") is None


def test_resolve_substitutes_static_dims_and_names_missing_ones():
    head = get_contract("radm_head").resolve(STATIC)
    assert head.input("text_features").shape == ("batch", "lines", 16)
    with pytest.raises(ContractError, match="text_dim"):
        get_contract("radm_head").resolve({"fpn_channels": 8, "num_classes": 4})


def test_validate_accepts_samples_and_reports_sizes():
    head = get_contract("radm_head").resolve(STATIC)
    sizes = default_sizes("other")
    inputs = sample_inputs(head, sizes, seed=1)
    seen = validate_inputs(head, inputs)
    assert seen["height/4"] == sizes["height"] // 4 and seen["lines"] == sizes["lines"]


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.pop("boxes"), "missing inputs"),
    (lambda x: x.__setitem__("boxes", x["boxes"].astype(np.float64)), "expected dtype float32"),
    (lambda x: x.__setitem__("boxes", x["boxes"][0]), "expected rank 3"),
    (lambda x: x.__setitem__("text_mask", x["text_mask"][:, :1]), "lines"),
    (lambda x: x["timestep"].__setitem__(0, np.nan), "NaN"),
    (lambda x: x["timestep"].__setitem__(0, 5000), "<= 1000"),
])
def test_validate_names_the_bad_tensor(mutate, message):
    head = get_contract("radm_head").resolve(STATIC)
    inputs = sample_inputs(head, {**default_sizes("small"), "lines": 3}, seed=2)
    mutate(inputs)
    with pytest.raises(ContractError, match=message):
        validate_inputs(head, inputs)


def test_integer_ids_must_stay_below_vocab():
    encoder = get_contract("radm_text_encoder").resolve(STATIC)
    inputs = sample_inputs(encoder, default_sizes("small"), seed=3)
    inputs["input_ids"][0, 0] = 50
    with pytest.raises(ContractError, match="input_ids.*< 50"):
        validate_inputs(encoder, inputs)


def test_pixel_sizes_must_be_multiples_of_64():
    backbone = get_contract("radm_backbone").resolve({"fpn_channels": 8})
    image = np.zeros((1, 3, 300, 256), np.float32)
    with pytest.raises(ContractError, match="multiple of 64"):
        validate_inputs(backbone, {"image": image})


def test_unknown_model_is_named():
    with pytest.raises(ContractError, match="unknown model 'nope'"):
        get_contract("nope")
