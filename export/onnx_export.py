"""ONNX export of one Exportable, and its parity check against the PyTorch module in ONNX Runtime."""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from posterrt.runtime.errors import ParityError
from posterrt.runtime.samples import default_sizes

from .spec import Exportable

OPSET = 17  # the legacy (dynamo=False) exporter is exact at 17; dynamo=True needs >= 18 here
TWO_GB = 2 ** 31 - 1


def export_onnx(exportable: Exportable, path: Path, weights_file: bool = False) -> list[str]:
    """Trace ``exportable`` to ``path``. Returns the external-data file names (empty below 2 GB unless
    ``weights_file``: then the weights always go to ``<model>.onnx.data``, for other graphs to share)."""
    contract = exportable.contract
    trace_inputs = exportable.inputs(default_sizes("trace"), seed=0)
    args = tuple(torch.from_numpy(trace_inputs[n]) for n in contract.input_names)
    module = exportable.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected and harmless
        torch.onnx.export(
            module, args, str(path),
            input_names=contract.input_names, output_names=contract.output_names,
            dynamic_axes=contract.dynamic_axes(), opset_version=OPSET, do_constant_folding=True,
            dynamo=False,
        )
    return gather_external_data(path, always=weights_file)


def gather_external_data(path: Path, always: bool = False) -> list[str]:
    """Past 2 GB the tracer scatters one file per tensor beside ``path``; gather them into one
    ``<model>.onnx.data`` and delete the scattered files. Returns the external-data file names
    (empty when the model holds its weights inline).

    The scattered files are found from the locations the model records, not from tensor names:
    the exporter sanitizes names into file names ("onnx::MatMul_8181" -> "onnx__MatMul_8181")."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    scattered = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    if not scattered and not always:
        return []
    if scattered:
        load_external_data_for_model(model, str(path.parent))
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    for location in scattered - {data_name}:
        (path.parent / location).unlink(missing_ok=True)
    data_path = path.parent / data_name
    if not data_path.is_file():  # every tensor was under 1 KB: all inline
        return []
    data_path.chmod(path.stat().st_mode & 0o777)  # onnx writes it 0600; readers (Triton) need the model's mode
    return [data_name]


def share_weights(path: Path, owner: Path) -> list[str]:
    """Point every initializer of ``path`` that equals one of ``owner``'s external tensors (same dtype,
    shape and bytes) at that tensor in ``owner``'s data file, so two graphs of one network keep one copy
    of the weights on disk. Matching by content, not by name: the tracer names a weight after its
    module path, which differs between the graphs, and constant folding renames transposed weights.
    The few tensors without a twin stay inline. Returns the data files ``path`` now reads."""
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

    owner_model = onnx.load(str(owner), load_external_data=False)
    twins = {}
    for tensor in owner_model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            with open(owner.parent / info.location, "rb") as handle:
                handle.seek(info.offset or 0)
                content = handle.read(info.length)
            twins[(tensor.data_type, tuple(tensor.dims), hashlib.sha256(content).digest())] = info
    model = onnx.load(str(path))
    used = set()
    for tensor in model.graph.initializer:
        content = numpy_helper.to_array(tensor).tobytes()
        info = twins.get((tensor.data_type, tuple(tensor.dims), hashlib.sha256(content).digest()))
        if info is None:
            continue
        set_external_data(tensor, location=info.location, offset=info.offset or 0, length=len(content))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        used.add(info.location)
    onnx.save_model(model, str(path))
    for stale in path.parent.glob(path.name + ".data"):  # its own file (past 2 GB) is now unused
        stale.unlink()
    return sorted(used)


def relative_error(actual: np.ndarray, expected: np.ndarray, scale_mask: np.ndarray | None = None) -> tuple[float, float]:
    """(max abs error, max abs error / max |expected|): relative to the output's scale, so
    near-zero elements do not make the figure meaningless. ``scale_mask`` picks the entries that set
    the scale (the error is still taken over all entries)."""
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if expected.size else 0.0
    scaled = expected if scale_mask is None else expected[scale_mask]
    scale = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    return diff, diff / max(scale, 1e-12)


def check_parity(exportable: Exportable, onnx_path: Path, session_options=None) -> dict:
    """Run ONNX Runtime and the torch module on fresh random inputs at two sizes of every dynamic axis."""
    import onnxruntime as ort

    contract = exportable.contract
    options = session_options or ort.SessionOptions()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    module = exportable.module.eval()
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every export; recorded for replay
    runs, worst = [], 0.0
    for index, kind in enumerate(("small", "other")):
        inputs = exportable.inputs(default_sizes(kind), seed=seed + index)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[n]) for n in contract.input_names))
        actual = session.run(contract.output_names, inputs)
        outputs = {}
        for name, got, want in zip(contract.output_names, actual, expected):
            want = want.numpy()
            if got.shape != want.shape:
                raise ParityError(f"{exportable.name}: output {name!r} has shape {got.shape} in ONNX Runtime, "
                                  f"{want.shape} in PyTorch")
            scale_mask = exportable.parity_scale_mask(name, want) if exportable.parity_scale_mask else None
            max_abs, rel = relative_error(got, want, scale_mask)
            worst = max(worst, rel)
            outputs[name] = {"shape": list(got.shape), "max_abs": max_abs, "max_rel": rel}
        runs.append({"sizes": {k: v for k, v in default_sizes(kind).items()
                               if k in contract.input_dims()}, "outputs": outputs})
    report = {"seed": seed, "tolerance_rel": exportable.rtol, "max_rel": worst,
              "passed": worst <= exportable.rtol, "runs": runs}
    return report


def export_and_check(exportable: Exportable, folder: Path, weights_file: bool = False,
                     weights_from: Path | None = None) -> dict:
    """Export to ``folder/<name>.onnx`` and check parity; raises ParityError when it fails.
    ``weights_file``: keep the weights in ``<name>.onnx.data`` whatever their size; ``weights_from``:
    read the weights another graph of ``folder`` holds from its data file (:func:`share_weights`)."""
    path = folder / f"{exportable.name}.onnx"
    started = time.perf_counter()
    data_files = export_onnx(exportable, path, weights_file)
    if weights_from is not None:
        data_files = share_weights(path, weights_from)
    export_s = time.perf_counter() - started
    parity = check_parity(exportable, path)
    if not parity["passed"]:
        raise ParityError(f"{exportable.name}: ONNX Runtime differs from PyTorch by {parity['max_rel']:.2e} "
                          f"relative (tolerance {exportable.rtol:.0e}); seed {parity['seed']}")
    return {"file": path.name, "data_files": data_files, "export_seconds": round(export_s, 2),
            "parity": parity}
