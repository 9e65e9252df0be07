"""`posterrt bench` smoke test on the tiny bundle: the command runs and writes valid JSON, the
Markdown table and the plots. No timing assertions: figures belong in benchmarks/RESULTS.md."""
import json

import numpy as np
import pytest

from posterrt.benchmarks.flops import count_flops
from posterrt.runtime.bundle import Bundle
from posterrt.runtime.cli import main
from posterrt.runtime.contracts import validate_inputs


def test_bench_writes_json_table_and_plots(tiny_bundle, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--bundle", str(tiny_bundle), "--models", "radm_text_encoder,plannet_denoiser",
                 "--pipelines", "layout", "--backends", "torch,ort,openvino,grpc", "--skip", "throughput",
                 "--repeats", "1", "--steps", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["machine"]["cores"] >= 1 and results["machine"]["peak"]["fp32_gflops"] > 0
    rows = {(r["model"], r["batch"]) for r in results["models"]}
    assert rows == {(m, b) for m in ("radm_text_encoder", "plannet_denoiser") for b in (1, 2)}
    for row in results["models"]:
        assert set(row["latency"]) == {"torch", "ort", "openvino"} and row["gflop"] > 0 and row["flops_unknown_nodes"] == 0
        assert row["openvino_speedup_vs_torch"] > 0
    backends = {r["backend"] for r in results["stages"]}
    assert {"embedded", "triton-grpc"} <= backends
    stages = {r["stage"] for r in results["stages"] if r["backend"] == "embedded"}
    assert "end_to_end" in stages and "model:radm_head" in stages
    assert "| radm_text_encoder |" in (out / "bench.md").read_text()
    for plot in ("latency_models.png", "latency_stages.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_count_matches_a_hand_count(tmp_path):
    """One Gemm [2,8]x[8,16] plus one MatMul [2,16]x[16,4]: 2*2*8*16 + 2*2*16*4 = 768 FLOPs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.ones((8, 16), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((16, 4), np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w1, w2])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert count_flops(path, {"x": np.zeros((2, 8), np.float32)})["total"] == 768


def test_perf_inputs_follow_the_contracts(tiny_bundle, tmp_path):
    assert main(["bench", "perf-inputs", "--bundle", str(tiny_bundle), "--out", str(tmp_path)]) == 0
    bundle = Bundle(tiny_bundle)
    for model in bundle.models:
        entry = json.loads((tmp_path / f"{model}.json").read_text())["data"][0]
        contract = bundle.contract(model)
        arrays = {}
        for spec in contract.inputs:
            shape = entry[spec.name]["shape"]
            # perf_analyzer shapes omit the batch axis; a [batch] tensor is sent as [1]
            full = (1, *shape) if len(spec.shape) > 1 else (1,)
            arrays[spec.name] = np.array(entry[spec.name]["content"], dtype=spec.np_dtype).reshape(full)
        validate_inputs(contract, arrays)


def test_bound_step_bench_times_run_and_bound_call(tiny_bundle, tmp_path):
    from posterrt.benchmarks import bound_step

    assert bound_step.main(["--bundle", str(tiny_bundle), "--model", "bg_unet", "--repeats", "1",
                            "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bound_step-bg_unet.json").read_text())
    assert set(result["timings"]) == {"run, all inputs", "bound step (IO binding)"}
    assert all(stats["p50_ms"] > 0 for stats in result["timings"].values())


def test_op_profile_sums_the_steps_kernels_per_op_type(tiny_bundle, tmp_path):
    from posterrt.benchmarks import op_profile

    assert op_profile.main(["--bundle", str(tiny_bundle), "--model", "render_unet", "--steps", "2",
                            "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "op_profile-render_unet.json").read_text())
    assert len(result["step_wall_ms"]) == 2 and result["variant"] == "export"
    ops = {row["op"]: row for row in result["ops"]}
    assert "Conv" in ops and ops["Conv"]["nodes_per_step"] > 0, "the UNet's convolutions are in the profile"
    assert sum(row["share"] for row in result["ops"]) == pytest.approx(1.0)
    # the kernels ran inside the timed runs: their sum cannot exceed the runs' wall time
    assert 0 < result["kernel_ms_per_step"] <= max(result["step_wall_ms"])
    assert result["command"].startswith("python -m posterrt.benchmarks.op_profile")


def test_plan_step_bench_times_the_embedded_loop(tiny_bundle, capsys):
    from posterrt.benchmarks import plan_step

    result = plan_step.measure(tiny_bundle, plans=2, warmup=1)
    # one denoiser call per level that reveals a token: at most one per level
    assert 1 < result["steps"] <= Bundle(tiny_bundle).config["plannet"]["num_timesteps"]
    assert result["gap_p50_us"] > 0 and result["model_call_p50_ms"] > 0
    # the interval spans a call and the gap after it: their medians agree with it within rounding
    assert result["interval_p50_ms"] == pytest.approx(result["model_call_p50_ms"] + result["gap_p50_us"] / 1e3, rel=0.2)
    assert plan_step.main(["--bundle", str(tiny_bundle), "--plans", "1"]) == 0
    assert "interval / call" in capsys.readouterr().out


@pytest.mark.parametrize("pipeline", ["layout", "poster"])
def test_refine_metrics_scores_raw_and_refined_layouts_of_the_same_proposals(tiny_bundle, tmp_path, pipeline):
    from posterrt.benchmarks.refine_metrics import main as refine_metrics

    out = tmp_path / "refine"
    assert refine_metrics(["--bundle", str(tiny_bundle), "--pipeline", pipeline, "--seeds", "2", "--size", "256",
                           "--out", str(out)]) == 0
    reports = {name: json.loads((out / f"{name}_report.json").read_text()) for name in ("raw", "refined")}
    assert len(reports["raw"]["layouts"]) == len(reports["refined"]["layouts"]) == 2
    assert reports["refined"]["means"]["posterlayout.overlap"] == 0.0
    for seed in range(2):
        raw, refined = (json.loads((out / name / f"{seed}.json").read_text()) for name in ("raw", "refined"))
        same = ("class", "box", "score")
        assert [[p[k] for k in same] for p in raw["proposed"]] == [[p[k] for k in same] for p in refined["proposed"]]
    assert "| `posterlayout.overlap` |" in (out / "table.md").read_text()
    # again from what the run wrote, without the models: the same proposals, the same raw layouts
    before = (out / "raw" / "0.json").read_text()
    assert refine_metrics(["--recompose", "--seeds", "2", "--out", str(out)]) == 0
    assert (out / "raw" / "0.json").read_text() == before
