"""A served model's contract as a Triton model configuration (``config.pbtxt``).

Built as Triton's own protobuf message (``tritonclient.grpc.model_config_pb2``) and printed with
``text_format``, so every config written is one Triton can parse. The same shape mapping is used by
the client (``triton_shape``, ``to_wire``) so what the repository declares and what the client sends
cannot drift apart.

Shape mapping. Triton batches along a leading batch axis that the config leaves out of ``dims``
(``max_batch_size`` > 0). The first axis of every contract tensor is its batch axis, so ``dims`` are
the remaining axes: fixed and static sizes as numbers, dynamic ones as -1. A tensor that is only
the batch axis (``timestep: [batch]``) has no dims left, which Triton does not allow; it is declared
``dims: [1]`` with ``reshape: { shape: [] }``: clients send ``[batch, 1]``, the model sees ``[batch]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from ..contracts import DYNAMIC_DIMS, EPILOGUE, ModelContract, TensorSpec, dim_range, is_dynamic
from ..profiles import PROFILE_KEYS, model_profile, ort_shape_string
from ..errors import InputError

FLAVORS = ("cpu", "gpu-onnx", "gpu-trt")
GPU_ACCELERATORS = ("tensorrt", "cuda")
TRT_PRECISIONS = ("FP16", "FP32")

#: contract dtype -> Triton wire datatype (the config's enum is "TYPE_" + this)
WIRE_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}

#: Parameter keys posterrt writes into every config. The ONNX hash lets a client check that the
#: server serves the weights of the bundle it was given, not only tensors of the right shapes.
ONNX_SHA256_PARAMETER = "posterrt_onnx_sha256"
CONTRACT_VERSION_PARAMETER = "posterrt_contract_version"
#: a server stage's identity (ServerStage.identity: driven models' hashes and the stage's settings);
#: a client uses the stage only where it equals its own bundle's
STAGE_SHA256_PARAMETER = "posterrt_stage_sha256"
#: {model: variant} of the driven models a server stage runs as variants (JSON)
STAGE_VARIANTS_PARAMETER = "posterrt_stage_variants"


def max_batch_size(contract: ModelContract) -> int:
    """Triton's ``max_batch_size``: the upper bound of the model's batch axis in the contracts."""
    rng = dim_range(contract.batch_dim)
    assert rng is not None, f"{contract.name}: the first axis {contract.batch_dim!r} must be dynamic"
    return rng.max


def contract_max_request_bytes(contract: ModelContract) -> int:
    """Bytes of the largest request a resolved contract allows: every input with every dynamic axis
    (the batch axis included) at its maximum. Anything bigger cannot be valid, so the server
    refuses it on its size alone, before looking at the values."""
    sizes = {name: rng.max for name, rng in DYNAMIC_DIMS.items()}
    return sum(int(np.prod(spec.concrete_shape(sizes))) * spec.np_dtype.itemsize for spec in contract.inputs)


def config_dims(spec: TensorSpec) -> list[int]:
    """``dims`` of a tensor in the config: the axes after the batch axis, -1 where dynamic."""
    return [-1 if is_dynamic(symbol) else int(symbol) for symbol in spec.shape[1:]] or [1]


def triton_shape(spec: TensorSpec) -> list[int]:
    """The full shape Triton reports in model metadata and expects on the wire (-1 = any)."""
    return [-1, *config_dims(spec)]


def to_wire(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A contract-shaped array as the client sends it (rank-1 ``[batch]`` becomes ``[batch, 1]``)."""
    return array.reshape(-1, 1) if len(spec.shape) == 1 else array


def from_wire(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    return array.reshape(-1) if len(spec.shape) == 1 else array


def _tensor(message, spec: TensorSpec) -> None:
    message.name = spec.name
    message.data_type = pb.DataType.Value("TYPE_" + WIRE_DTYPES[spec.dtype])
    message.dims.extend(config_dims(spec))
    if len(spec.shape) == 1:
        message.reshape.SetInParent()  # an empty shape: the model sees [batch]


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


def default_batching(contract: ModelContract) -> BatchingPolicy:
    """Dynamic batching defaults, by the model's role.

    * step models (radm_head, plannet_denoiser, the UNets) run many times per request: batching
      concurrent requests is where serving throughput comes from;
    * prologue encoders run once per request: batched the same way;
    * the epilogue (vae_decoder) is off: full-size images, memory grows with the batch and the
      GPU is already busy at batch 1.
    No queue delay: with one instance per model, requests that arrive while the instance runs
    queue up and leave together as the next batch anyway, so under load batches form without
    waiting; a delay only taxes the request that finds the model idle. Measured on the 2-core
    bench machine, the former 500 us (step) / 1000 us (prologue) delays cost every lone call
    0.6-1.3 ms (60-130 ms per 100-step PlanNet plan) and did not raise throughput at 4 clients
    (benchmarks/RESULTS.md, Serving). No preferred sizes either: Triton then forms the largest
    batch the queue allows, which its docs advise unless some sizes are much faster.
    """
    if contract.role == EPILOGUE:
        return BatchingPolicy(False)
    return BatchingPolicy(True, 0)


#: cpu flavor: models served by two instances by default. One instance runs one batch at a time on
#: ``intra_op_threads`` (1) cores; for a model whose cost is linear in the batch, batching alone
#: then adds no throughput, a second instance lets a second batch use the second core. radm_head
#: is that model (100 RoI proposals per image, each pooled and run through the head: 16-19 ms of
#: CPU per request at batch 1 and at batch 4, benchmarks/RESULTS.md). plannet_denoiser's cost is
#: per call (batching amortizes it), but one instance's stub is then the serial part: at 4
#: clients it kept 1.24 cores busy (587 requests/s against 406 at 1 client, 1.45x) and two
#: instances 1.7 cores (699, 1.79x); at 1 client the second instance changed nothing beyond noise
#: (391 vs 401). Its weights are small (99 MB at paper size). Not the UNets: too large to hold
#: twice (3.5 and 4.9 GB at paper size).
DEFAULT_CPU_INSTANCES = {"radm_head": 2, "plannet_denoiser": 2}


@dataclass
class ServingOptions:
    """Everything ``posterrt repo build`` lets a user choose, with the defaults it documents."""

    flavor: str = "cpu"
    #: None: per-role defaults (default_batching); True/False force it on/off for every model
    dynamic_batching: bool | None = None
    max_queue_delay_us: int | None = None  # overrides the per-role delay
    preferred_batch_sizes: tuple[int, ...] = ()
    #: instances of every model; None: per-model defaults (:data:`DEFAULT_CPU_INSTANCES` on the
    #: cpu flavor, 1 elsewhere)
    instances: int | None = None
    #: per-model instance counts, over ``instances`` (``--model-instances radm_head=2``)
    model_instances: dict = field(default_factory=dict)
    #: ONNX Runtime threads per model instance on the cpu flavor. 1: Triton already runs the
    #: models' instances side by side (one stub process each); more threads per model would
    #: oversubscribe a small machine as soon as two models are busy.
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    #: cpu flavor: per-model intra-op thread counts over ``intra_op_threads``
    #: (``--model-threads bg_unet=2``: the UNets and radm_head gain from a second core per call,
    #: sub-millisecond models lose, benchmarks/RESULTS.md)
    model_threads: dict = field(default_factory=dict)
    #: cpu flavor: let idle ONNX Runtime pool threads spin (off: they would burn cores the other
    #: models' stubs need; on only pays with intra_op_threads > 1 on an otherwise idle machine)
    allow_spinning: bool = False
    #: cpu flavor: also serve the sampling loops that run in the server (``plannet_sampler``, one
    #: request per PlanNet plan instead of one per step) when every model is written
    server_loops: bool = True
    gpu_accelerator: str = "tensorrt"  # gpu-onnx: "tensorrt" (TensorRT EP, CUDA fallback) or "cuda"
    trt_precision: str = "FP16"
    trt_workspace_bytes: int = 4 << 30
    trt_engine_cache_dir: str | None = "/tmp/posterrt-trt-cache"
    extra_parameters: dict = field(default_factory=dict)
    #: cpu flavor: the largest request (sum of its input tensors' bytes) a model accepts. None: the
    #: largest request the contract allows (every axis at its max), see ``contract_max_request_bytes``.
    max_request_bytes: int | None = None

    def __post_init__(self):
        if self.flavor not in FLAVORS:
            raise InputError(f"--flavor: unknown flavor {self.flavor!r}; expected one of {', '.join(FLAVORS)}")
        if self.gpu_accelerator not in GPU_ACCELERATORS:
            raise InputError(f"--accelerator: {self.gpu_accelerator!r} is not one of {', '.join(GPU_ACCELERATORS)}")
        self.trt_precision = self.trt_precision.upper()
        if self.trt_precision not in TRT_PRECISIONS:
            raise InputError(f"--precision: {self.trt_precision!r} is not one of {', '.join(TRT_PRECISIONS)}")
        for name in ("instances", "intra_op_threads", "inter_op_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for flag, counts in (("--model-instances", self.model_instances), ("--model-threads", self.model_threads)):
            bad = {model: count for model, count in counts.items()
                   if not isinstance(count, int) or isinstance(count, bool) or count < 1}
            if bad:
                raise InputError(f"{flag}: counts must be integers >= 1, got {bad}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise InputError(f"--queue-delay-us: must be >= 0, got {self.max_queue_delay_us}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise InputError(f"--max-request-mb: must be > 0, got {self.max_request_bytes / 1e6:g} MB")

    def instance_count(self, contract: ModelContract) -> int:
        if contract.name in self.model_instances:
            return self.model_instances[contract.name]
        if self.instances is not None:
            return self.instances
        return DEFAULT_CPU_INSTANCES.get(contract.name, 1) if self.flavor == "cpu" else 1

    def batching(self, contract: ModelContract, limit: int) -> BatchingPolicy:
        policy = default_batching(contract)
        enabled = policy.enabled if self.dynamic_batching is None else self.dynamic_batching
        delay = policy.max_queue_delay_us if self.max_queue_delay_us is None else self.max_queue_delay_us
        bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= limit]
        if bad and enabled:
            raise InputError(f"--preferred-batch-sizes: {bad} outside 1..{limit} (max batch of {contract.name})")
        return BatchingPolicy(enabled, delay, tuple(self.preferred_batch_sizes))


def build_model_config(contract: ModelContract, options: ServingOptions, parameters: dict | None = None,
                       max_batch: int | None = None) -> pb.ModelConfig:
    """The Triton config of one resolved contract for ``options.flavor``.

    ``max_batch``: a smaller batch limit than the contract's, when the model file supports less
    (a TensorRT plan built with a narrower profile)."""
    limit = max_batch_size(contract) if max_batch is None else min(max_batch, max_batch_size(contract))
    config = pb.ModelConfig(name=contract.name, max_batch_size=limit)
    for spec in contract.inputs:
        _tensor(config.input.add(), spec)
    for spec in contract.outputs:
        _tensor(config.output.add(), spec)

    policy = options.batching(contract, limit)
    if policy.enabled:
        config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(policy.preferred_batch_sizes)

    gpu = options.flavor != "cpu"
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
                              count=options.instance_count(contract))
    params = dict(options.extra_parameters)
    if options.flavor == "cpu":
        config.backend = "python"
        # same keys as Triton's ONNX Runtime backend, read by our generic model.py
        params.update(intra_op_thread_count=str(options.model_threads.get(contract.name, options.intra_op_threads)),
                      inter_op_thread_count=str(options.inter_op_threads))
        if options.allow_spinning:  # model.py's default is off
            params["allow_spinning"] = "1"
    elif options.flavor == "gpu-onnx":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        _gpu_accelerator(config, contract, options)
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    params.update(parameters or {})
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    return config


def _gpu_accelerator(config: pb.ModelConfig, contract: ModelContract, options: ServingOptions) -> None:
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name=options.gpu_accelerator)
    if options.gpu_accelerator == "cuda":
        return
    profile = model_profile(contract)  # the same profile `posterrt engines build` uses
    settings = {
        "precision_mode": options.trt_precision,
        "max_workspace_size_bytes": str(options.trt_workspace_bytes),
        # explicit profiles from the contracts' ranges: otherwise the EP rebuilds an engine each
        # time a request brings a shape outside the ones it has seen
        **{f"trt_profile_{key}_shapes": ort_shape_string(profile, key) for key in PROFILE_KEYS},
    }
    if options.trt_engine_cache_dir:
        settings.update(trt_engine_cache_enable="1",
                        trt_engine_cache_path=f"{options.trt_engine_cache_dir.rstrip('/')}/{contract.name}")
    for key, value in settings.items():
        accelerator.parameters[key] = value


def to_pbtxt(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())
