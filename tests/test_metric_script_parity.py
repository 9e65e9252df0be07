"""The parts of benchmarks/metric_script_parity.py that run without the benchmark scripts: reading a
torch.save'd numpy array from its pickle opcodes, never unpickling it."""
import numpy as np
import pytest

from posterrt.benchmarks.metric_script_parity import array_from_torch_save

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).random((5, 3, 4), dtype=np.float32) - 0.5,  # PosterLayout's boxes
    np.random.default_rng(1).integers(0, 4, (5, 3, 1)),  # and clses (int64)
])
def test_torch_saved_arrays_read_from_opcodes(tmp_path, array, monkeypatch):
    path = tmp_path / "a.pt"
    torch.save(array, path)
    import pickle
    monkeypatch.setattr(pickle, "loads", None)  # nothing may unpickle
    monkeypatch.setattr(pickle, "load", None)
    read = array_from_torch_save(path)
    assert read.dtype == array.dtype and read.shape == array.shape
    np.testing.assert_array_equal(read, array)
