"""`posterrt engines refit`: new weights into a refittable plan, without a rebuild.

The use: a new personalized-style adapter or LoRA for ``bg_unet``. Merge it into the UNet weights,
export the UNet again (same graph, other weights), then refit. The new ONNX goes through the same
clean-up and precision policy as the build (recorded in the manifest), so its initializers carry
the names and types the engine's weights were built from, and TensorRT's ONNX parser refitter maps
them by name. We use REFIT (weights may change), not REFIT_IDENTICAL (which assumes the build's
own weights come back, the weight-stripped-plan use case).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from posterrt.runtime.bundle import sha256_file

from .build import file_logger, import_tensorrt, load_plugins, plan_digest, write_atomic
from .cleanup import prepare_onnx
from .manifest import (EngineError, check_engine_compatible, check_plan_hash, current_gpu, now, read_manifest,
                       write_manifest)


def entry_for_plan(manifest: dict, plan: Path) -> dict:
    for entry in manifest["engines"].values():
        if entry.get("plan") == plan.name:
            return entry
    raise EngineError(f"--engine {plan}: the manifest beside it lists no such plan; build it with `posterrt engines build`")


def refit_weights(trt, engine, onnx_path: Path, logger) -> int:
    """Refit ``engine`` in place from ``onnx_path``; returns the number of refittable weights."""
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)) or "no details"
        raise EngineError(f"the ONNX {onnx_path.name} does not fit the engine's weights: {errors} "
                          f"(was it exported from another graph? a refit only changes weights)")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise EngineError(f"the refit left {len(missing)} weights unset (first: {missing[0]!r}); "
                          f"the new ONNX must carry every weight of the graph")
    if not refitter.refit_cuda_engine():
        raise EngineError("TensorRT refused the refit; see the refit log")
    return len(refitter.get_all_weights())


def refit_engine(plan_path, onnx_path) -> dict:
    trt = import_tensorrt()
    plan, onnx_path = Path(plan_path), Path(onnx_path)
    if not plan.is_file():
        raise EngineError(f"--engine {plan} does not exist")
    if not onnx_path.is_file():
        raise EngineError(f"--onnx {onnx_path} does not exist")
    manifest = read_manifest(plan.parent)
    entry = entry_for_plan(manifest, plan)
    model = entry["model"]
    check_engine_compatible(entry, current_gpu(), trt.__version__)
    if not entry["build_options"].get("refittable"):
        raise EngineError(f"engine {model!r} was built without REFIT; rebuild it refittable: "
                          f"posterrt engines build --models {model} --refittable {model}")
    log_path = plan.with_name(f"{model}.refit.log")
    logger = file_logger(trt, log_path)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"posterrt-refit-{model}-", dir=plan.parent) as work:
            prepared = Path(work) / f"{model}.onnx"
            prepare_onnx(onnx_path, prepared, model_name=model, precision=entry["precision"],
                         tool=entry["build_options"].get("clean_tool", "auto"), refittable=True)
            data = plan.read_bytes()
            # The plan must be the recorded one, or the one an interrupted refit announced (running
            # the refit again finishes that job); anything else was replaced behind our back.
            if plan_digest(data) != entry.get("refit_pending_sha256"):
                check_plan_hash(plan, entry)
            load_plugins(trt, logger, entry.get("plugins", ()))
            engine = trt.Runtime(logger).deserialize_cuda_engine(data)
            if engine is None:
                raise EngineError(f"TensorRT could not load {plan}; rebuild it")
            weights = refit_weights(trt, engine, prepared, logger)
            refitted = bytes(engine.serialize())
            # Announce the new plan, write it, then record it: interrupted anywhere, the manifest
            # and the plan disagree (loads refuse the plan) and a second refit completes the job.
            entry["refit_pending_sha256"] = plan_digest(refitted)
            write_manifest(plan.parent, manifest)
            write_atomic(plan, refitted)
    finally:
        logger.close()
    entry["refits"].append({"onnx": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path), "refitted": now(),
                            "weights": weights, "seconds": round(time.perf_counter() - started, 1)})
    entry["plan_sha256"] = entry.pop("refit_pending_sha256")
    write_manifest(plan.parent, manifest)
    return entry
