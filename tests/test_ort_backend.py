"""The embedded ONNX Runtime backend on a real (hand-made, two-model) bundle written by the export code,
and on the tiny bundle of all twelve models against the PyTorch reference backend."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from posterrt.export.onnx_export import export_and_check
from posterrt.export.spec import ContractModule, Exportable
from posterrt.runtime.backends.onnxruntime import OrtBackend
from posterrt.runtime.bundle import BUNDLE_FORMAT, MANIFEST, Bundle, sha256_file
from posterrt.runtime.contracts import CONTRACT_VERSION, MODEL_NAMES
from posterrt.runtime.errors import BundleError, ContractError, InputError
from posterrt.runtime.samples import default_sizes, sample_inputs


class ToyDecoder(torch.nn.Module):
    """Stands in for vae_decoder: latent [B, 4, h, w] -> image [B, 3, 8h, 8w] in 0..1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(4, 3, 1)

    def forward(self, latent):
        image = torch.sigmoid(self.mix(latent))
        return torch.nn.functional.interpolate(image, scale_factor=8, mode="nearest")


class ToyEncoder(torch.nn.Module):
    """Stands in for vae_encoder: image [B, 3, H, W] -> latent [B, 4, H/8, W/8]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.mix = torch.nn.Conv2d(3, 4, 8, stride=8)

    def forward(self, image):
        return self.mix(image)


TOY_MODULES = {"vae_decoder": ToyDecoder, "vae_encoder": ToyEncoder}


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_bundle")
    manifest = {"format": BUNDLE_FORMAT, "contract_version": CONTRACT_VERSION, "preset": "toy", "models": {},
                "config": {}, "assets": {}}
    for name, cls in TOY_MODULES.items():
        exportable = Exportable(name, ContractModule(cls(), ["out"]).eval(), {"latent_channels": 4}, {})
        entry = export_and_check(exportable, folder)
        entry.update(sha256=sha256_file(folder / entry["file"]), static_dims=exportable.static_dims)
        manifest["models"][name] = entry
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _toy_inputs(backend, model, seed=0):
    return sample_inputs(backend.contract(model), default_sizes("small"), seed=seed)


def test_outputs_match_the_torch_module(toy_bundle):
    backend = OrtBackend(Bundle(toy_bundle), intra_op_threads=1)
    rng = np.random.default_rng(123)  # fresh random inputs, not the export's trace inputs
    latent = rng.standard_normal((2, 4, 40, 48)).astype(np.float32)
    out = backend.run("vae_decoder", {"latent": latent})
    assert set(out) == {"image"} and out["image"].shape == (2, 3, 320, 384)
    with torch.no_grad():
        expected = ToyDecoder()(torch.from_numpy(latent)).numpy()
    np.testing.assert_allclose(out["image"], expected, rtol=0, atol=1e-5)


def test_sessions_are_lazy_and_built_once(toy_bundle):
    backend = OrtBackend(Bundle(toy_bundle))
    assert backend._sessions == {}
    backend.run("vae_decoder", _toy_inputs(backend, "vae_decoder"))
    first = backend.session("vae_decoder")
    backend.run("vae_decoder", _toy_inputs(backend, "vae_decoder", seed=1))
    assert backend.session("vae_decoder") is first
    assert set(backend._sessions) == {"vae_decoder"}  # the encoder was never asked for


def test_concurrent_first_calls_share_one_session(toy_bundle):
    backend = OrtBackend(Bundle(toy_bundle), intra_op_threads=1)
    inputs = _toy_inputs(backend, "vae_encoder")
    results, sessions, errors = [], [], []

    def call():
        try:
            results.append(backend.run("vae_encoder", inputs)["latent"])
            sessions.append(backend.session("vae_encoder"))
        except Exception as error:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({id(s) for s in sessions}) == 1
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_thread_counts_and_optimization_level_reach_the_session(toy_bundle):
    import onnxruntime as ort

    backend = OrtBackend(Bundle(toy_bundle), intra_op_threads=1, inter_op_threads=2)
    options = backend.session("vae_decoder").get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("kwargs, field", [({"intra_op_threads": 0}, "intra_op_threads"),
                                           ({"inter_op_threads": -2}, "inter_op_threads"),
                                           ({"providers": ["NoSuchExecutionProvider"]}, "providers"),
                                           ({"optimization_level": "max"}, "optimization_level")])
def test_bad_options_are_refused_by_name(toy_bundle, kwargs, field):
    with pytest.raises(InputError, match=field):
        OrtBackend(Bundle(toy_bundle), **kwargs)


def test_inputs_are_checked_against_the_contract(toy_bundle):
    backend = OrtBackend(Bundle(toy_bundle))
    with pytest.raises(ContractError, match="dtype float32"):
        backend.run("vae_decoder", {"latent": np.zeros((1, 4, 32, 32), np.float64)})
    with pytest.raises(ContractError, match="axis 1 must be 4"):
        backend.run("vae_decoder", {"latent": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(ContractError, match="missing inputs"):
        backend.run("vae_decoder", {})


def test_missing_model_and_edited_file_are_refused(toy_bundle, tmp_path):
    with pytest.raises(BundleError, match="lacks models \\['bg_unet'\\]"):
        OrtBackend(Bundle(toy_bundle)).run("bg_unet", {})
    # a copy of the bundle whose ONNX file was altered after export
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(toy_bundle, copy)
    with open(copy / "vae_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    backend = OrtBackend(Bundle(copy))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        backend.run("vae_decoder", _toy_inputs(backend, "vae_decoder"))


def test_bundle_of_another_contract_version_is_refused(toy_bundle, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(toy_bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["contract_version"] = CONTRACT_VERSION + 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="contract version"):
        Bundle(copy)


# ---------------------------------------------------------------------------------------------
# The twelve tiny models: ONNX Runtime against the PyTorch reference backend, model by model.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_tiny_model_matches_the_torch_backend(request, model):
    tiny_bundle = request.getfixturevalue("tiny_bundle")
    from posterrt.export.registry import MODEL_FAMILY, family_module
    from posterrt.export.torch_backend import TorchBackend

    bundle = Bundle(tiny_bundle)
    ort_backend, torch_backend = OrtBackend(bundle, intra_op_threads=2), TorchBackend(bundle)
    # the family's own input generator knows which inputs random numbers cannot fake (valid boxes)
    exportable = family_module(MODEL_FAMILY[model]).build(model, bundle.preset, torch_backend.sources)
    inputs = exportable.inputs(default_sizes("small"), seed=int.from_bytes(np.random.bytes(4), "little"))
    got, want = ort_backend.run(model, inputs), torch_backend.run(model, inputs)
    for name in ort_backend.contract(model).output_names:
        scale = max(float(np.abs(want[name]).max()), 1e-12)
        assert float(np.abs(got[name] - want[name]).max()) / scale <= 1e-4, name  # the export's fp32 tolerance
