"""The families table (runtime/families.py) is the one list of models per family: export, the
quality gates, the pipelines and the server loops agree with it."""
from __future__ import annotations

from posterrt.runtime.contracts import CONTRACTS
from posterrt.runtime.families import FAMILIES, MODEL_FAMILY, family_of, unet_families


def test_every_served_model_has_one_family_and_a_stage_that_runs_it():
    assert sorted(MODEL_FAMILY) == sorted(CONTRACTS)
    for family in FAMILIES.values():
        assert family.denoiser in family.models
        assert CONTRACTS[family.denoiser].role == "step", f"{family.name}'s denoiser is called once per step"
        assert all(MODEL_FAMILY[model] != family.name for model in family.borrows), "borrowed from another family"
        assert family_of(family.denoiser) is family
        for model in family.cached_steps:  # the feature cache's graphs are steps of the denoiser's family
            assert CONTRACTS[model].role == "step" and model.startswith(family.denoiser)


def test_lists_elsewhere_derive_from_the_table():
    from posterrt.engines.quality_gate import UNET_FAMILY
    from posterrt.export.registry import FAMILIES as EXPORTED, family_module
    from posterrt.runtime.pipelines import background, layout, plan, render
    from posterrt.runtime.server_stages import SERVER_STAGES

    assert EXPORTED == {name: family.models for name, family in FAMILIES.items()}
    for name in FAMILIES:  # each family has its export module
        assert callable(family_module(name).build)
    assert UNET_FAMILY == {"bg_unet": "stable_diffusion", "render_unet": "rendernet"}
    assert set(unet_families()) == {"bg_unet", "render_unet"}
    assert layout.MODELS == SERVER_STAGES["radm_layout"].models == FAMILIES["radm"].models
    assert {stage.models for stage in SERVER_STAGES.values() if stage.stub == "unet_sampler"} == {("bg_unet",), ("render_unet",)}
    assert set(background.MODELS) == set(FAMILIES["stable_diffusion"].models) - {"bg_unet_deep", "bg_unet_shallow"}
    assert set(render.MODELS) == {"clip_text_encoder", "render_condition", "render_unet", "vae_decoder"}
    assert plan.MODELS == ("plannet_encoder", "plannet_denoiser")


def test_each_family_config_is_in_an_exported_bundle(tiny_bundle):
    from posterrt.runtime.bundle import Bundle

    bundle = Bundle(tiny_bundle)
    for family in FAMILIES.values():
        assert family.config_key in bundle.config, family.name
