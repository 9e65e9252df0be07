"""Where one UNet-class step's time goes, per ONNX Runtime operator type: ORT's own profiler over a
few steps of the same guided request ``unet_step`` times, summed per op type (ms per step, share,
nodes per step). It reads the graph ORT actually runs (after its QDQ and fusion passes), which is
what the int8 recipe's decisions in benchmarks/RESULTS.md rest on.

    python -m posterrt.benchmarks.op_profile --bundle /work/bundles/paper --model render_unet --variant int8
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from posterrt.runtime.bundle import Bundle

from .unet_step import record, step_inputs


def profile_step(path: Path, inputs: dict, threads: int, steps: int) -> dict:
    """Per op type: total kernel microseconds over ``steps`` runs and node count; plus each run's wall ms."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="posterrt-profile-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "step")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        walls = []
        for _ in range(steps + 1):  # the first run warms up and is left out of the sums
            started = time.perf_counter()
            session.run(None, inputs)
            walls.append((time.perf_counter() - started) * 1e3)
        events = json.loads(Path(session.end_profiling()).read_text())
    warm_up = next(e for e in events if e.get("name") == "model_run")
    warm_end = warm_up["ts"] + warm_up["dur"]
    micros, nodes = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm_end:
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    total = sum(micros.values()) or 1
    ops = [{"op": op, "ms_per_step": us / steps / 1e3, "share": us / total, "nodes_per_step": nodes[op] // steps}
           for op, us in micros.most_common()]
    return {"step_wall_ms": walls[1:], "kernel_ms_per_step": total / steps / 1e3, "ops": ops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.op_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--model", default="bg_unet", choices=("bg_unet", "render_unet"))
    parser.add_argument("--variant", help="an ONNX variant from `posterrt engines optimize` (default: the export)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="runs summed, after one warm-up run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, help="folder for op_profile-MODEL.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    bundle = Bundle(args.bundle)
    path = bundle.model_path(args.model, variant=args.variant)
    if path.suffix != ".onnx":
        parser.error(f"--variant {args.variant}: {path.name} is not an ONNX file; ORT's profiler reads ONNX only")
    inputs = step_inputs(bundle, args.model, args.image_size, 500.0, 0)
    result = profile_step(path, inputs, args.threads, args.steps)
    result.update(model=args.model, variant=args.variant or "export", threads=args.threads)
    print(f"{args.model} ({result['variant']}), {args.threads} threads: step wall ms "
          f"{', '.join(f'{w:.0f}' for w in result['step_wall_ms'])}; kernels {result['kernel_ms_per_step']:.0f} ms/step")
    for row in result["ops"][:args.top]:
        print(f"  {row['op']:24s} {row['ms_per_step']:8.1f} ms/step  {row['share'] * 100:5.1f}%  "
              f"{row['nodes_per_step']} nodes")
    record(result, "op_profile", args.model, argv, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
