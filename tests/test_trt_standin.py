"""The stand-in ``tensorrt`` (tests/trt_standin.py) refuses what TensorRT's real API lacks.

These tests are what makes the engine tests mean something without a GPU: a misspelt call, a
wrong argument count or type, a write to a read-only property, a removed flag must fail here the
way it would fail on a real TensorRT."""
from __future__ import annotations

import pytest

from trt_standin import STUBS_VERSION, TENSORRT_11_REMOVED, API, StubMismatch, standin, stub_api, stub_class


def test_the_stubs_are_tensorrt_10_13s_and_parse_whole():
    import importlib.metadata

    assert importlib.metadata.version("tensorrt-stubs").startswith(STUBS_VERSION + ".")
    api = stub_api()
    assert len([c for c in api.values() if not isinstance(c, list)]) > 150
    builder_config = stub_class("IBuilderConfig")
    assert "set_timing_cache" in builder_config.methods and builder_config.properties["builder_optimization_level"][1]
    assert stub_class("NetworkDefinitionCreationFlag").members["STRONGLY_TYPED"] == 1
    assert stub_class("ILogger.Severity").members["VERBOSE"] == 4
    # the five lines pybind11-stubgen wrote that Python cannot parse were repaired, not dropped
    assert "add_scale_nd" in stub_class("INetworkDefinition").methods


@pytest.fixture
def trt():
    return standin()


def make_logger(trt):
    """A logger built the way engines/build.py's file_logger builds one."""

    class ListLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            self.lines.append(msg)

    return ListLogger()


@pytest.mark.parametrize("statement, message", [
    ("config.set_memory_pool_limt(trt.MemoryPoolType.WORKSPACE, 1)",
     "tensorrt.IBuilderConfig.set_memory_pool_limt is not in TensorRT 10.13's Python API"),
    ("config.builder_optimisation_level = 3", "tensorrt.IBuilderConfig.builder_optimisation_level cannot be set"),
    ("config.num_optimization_profiles = 2", "read-only in the stubs"),
    ("trt.BuilderFlag.STRONGLY_TYPED", "tensorrt.BuilderFlag.STRONGLY_TYPED is not in TensorRT 10.13's Python API"),
    ("trt.Builder(logger).create_network(flags=trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED, other=1)",
     "fit none of TensorRT's signatures"),
    ("config.set_timing_cache(config.create_timing_cache(b''))", "missing a required argument: 'ignore_mismatch'"),
    ("config.set_flag(3)", "TensorRT expects BuilderFlag, got int"),
    ("config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1.5 * 2**30)", "TensorRT expects int, got float"),
    ("trt.IBuilderConfig()", "has no Python constructor"),
    ("trt.Builder(object())", "TensorRT expects ILogger"),
    ("trt.OnnxParserRefiter", "tensorrt.OnnxParserRefiter is not in TensorRT 10.13's Python API"),
])
def test_a_misspelt_or_ill_typed_call_is_refused_naming_it(trt, statement, message):
    logger = make_logger(trt)
    config = trt.Builder(logger).create_builder_config()
    with pytest.raises((AttributeError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")):
        exec(statement, {"trt": trt, "config": config, "logger": logger})


def test_the_same_calls_spelt_right_are_accepted(trt):
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.builder_optimization_level = 3
    assert config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    config.set_flag(trt.BuilderFlag.REFIT)
    assert network.flags == 2 and config.get_flag(trt.BuilderFlag.REFIT)


def test_a_logger_with_the_wrong_log_signature_is_refused(trt):
    class Wrong(trt.ILogger):
        def log(self, msg):
            pass

    with pytest.raises(TypeError):
        trt.Builder(Wrong())


def test_a_stand_in_member_the_stubs_lack_fails_at_definition():
    api = API("10.13.0.35")
    with pytest.raises(StubMismatch, match="tensorrt.IBuilderConfig.set_fp16_mode is not in TensorRT 10.13"):
        @api.implements("IBuilderConfig")
        class Config:
            def set_fp16_mode(self):
                pass
    with pytest.raises(StubMismatch, match=r"set_memory_pool_limit\(pool, size\) does not have the stubs' parameters"):
        @api.implements("IBuilderConfig")
        class Config2:
            def set_memory_pool_limit(self, pool, size):
                pass


def test_tensorrt_11_lacks_the_weak_typing_api():
    trt11 = standin("11.4.0.106")
    for flag in TENSORRT_11_REMOVED["BuilderFlag"]:
        assert flag in stub_class("BuilderFlag").members  # present in 10.13 ...
        with pytest.raises(AttributeError, match=f"tensorrt.BuilderFlag.{flag} was removed in TensorRT 11.4.0.106"):
            getattr(trt11.BuilderFlag, flag)  # ... gone in 11
    assert trt11.BuilderFlag.REFIT and trt11.BuilderFlag.TF32 and trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert standin().BuilderFlag.FP16  # the 10.x stand-in keeps it
