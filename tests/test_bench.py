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


def test_e2e_bench_breaks_each_run_down_and_compares_backends(tiny_bundle, tmp_path, capsys):
    """Issue 18's end-to-end tool: each part is measured, the parts and 'other' add up to the run."""
    from posterrt.benchmarks import e2e

    table = e2e.measure(tiny_bundle, ["render"], size=256, steps=2, rounds=1, warmup=1, warmup_steps=1,
                        cache_intervals=(1, 2), progress=False)
    assert set(table["render"]) == {"torch", "embedded", "embedded N=2", "speedup_p50"}
    for side in ("torch", "embedded", "embedded N=2"):
        entry = table["render"][side]
        assert entry["mean_s"]["prologue"] > 0 and entry["mean_s"]["loop"] > 0 and entry["mean_s"]["epilogue"] > 0
        assert entry["mean_s"]["composition"] > 0
        assert sum(entry["mean_s"].values()) == pytest.approx(entry["total_p50_s"], rel=1e-6)  # one run: mean = p50
        assert 0 <= entry["not_model_share"] < 1
    assert set(table["render"]["speedup_p50"]) == {"embedded", "embedded N=2"}
    assert min(table["render"]["speedup_p50"].values()) > 0
    out = tmp_path / "e2e.json"
    assert e2e.main(["--bundle", str(tiny_bundle), "--pipelines", "background", "--size", "256x320", "--steps", "1",
                     "--rounds", "1", "--warmup", "0", "--memory", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["memory"]["torch"]["peak_rss_gb"] > record["memory"]["torch"]["before_models_gb"] > 0
    assert "| background | torch / embedded |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--cache-interval"):
        e2e.main(["--bundle", str(tiny_bundle), "--cache-interval", "0"])


def test_cache_curve_and_step_sweep_compare_against_their_references(tiny_bundle):
    from posterrt.benchmarks import cache_curve, step_sweep

    result = cache_curve.curve(tiny_bundle, "background", intervals=(1, 2), steps=3, rounds=1, warmup=0, progress=False)
    assert result["table"][1]["psnr_db"] is None and result["table"][1]["loop_speedup_p50"] == 1.0
    assert result["table"][2]["psnr_db"] > 0  # cached output is another picture, close to the uncached one
    assert set(result["step_p50_ms"]) == {"bg_unet", "bg_unet_deep", "bg_unet_shallow"}
    table = step_sweep.sweep(tiny_bundle, "background", schedulers=("ddim", "euler"), steps=(2,), reference_steps=3,
                             progress=False)
    assert set(table) == {"ddim", "euler"} and table["ddim"][2]["ssim"] <= 1.0
    assert "| euler |" in step_sweep.markdown(table, reference_steps=3)


def test_cache_step_costs_time_the_three_graphs_on_the_same_inputs(tiny_bundle, capsys):
    from posterrt.benchmarks import cache_curve

    result = cache_curve.step_costs(tiny_bundle, "render_unet", size=256, repeats=1, warmup=0)
    assert set(result["timings"]) == {"render_unet", "render_unet_deep", "render_unet_shallow"}
    assert result["shallow_over_plain"] > 0 and result["deep_over_plain"] > 0
    assert cache_curve.main(["--bundle", str(tiny_bundle), "--step-costs", "bg_unet", "--size", "256", "--rounds", "1"]) == 0
    assert "shallow / bg_unet:" in capsys.readouterr().out


def test_step_sweep_and_cache_curve_clis_name_what_they_run(tiny_bundle, tmp_path, capsys):
    from posterrt.benchmarks import cache_curve, step_sweep

    with pytest.raises(SystemExit):
        step_sweep.main(["--bundle", str(tiny_bundle), "--schedulers", "ddim,bogus"])
    assert "--schedulers: unknown bogus" in capsys.readouterr().err
    out = tmp_path / "sweep.json"
    assert step_sweep.main(["--bundle", str(tiny_bundle), "--schedulers", "euler", "--steps", "2", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["table"]) == {"euler"}
    out = tmp_path / "curve.json"
    assert cache_curve.main(["--bundle", str(tiny_bundle), "--intervals", "1,3", "--steps", "3", "--rounds", "1",
                             "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["table"]) == {"1", "3"}


def test_e2e_counts_overlapping_calls_once():
    from posterrt.benchmarks.e2e import covered_seconds

    assert covered_seconds([(0.0, 2.0), (1.0, 2.0), (5.0, 1.0), (5.5, 0.2)]) == pytest.approx(4.0)
    assert covered_seconds([]) == 0.0


def test_machine_peak_includes_the_int8_gemm_the_int8_variants_run_on():
    from posterrt.benchmarks.machine import gemm_peak_gflops

    peak = gemm_peak_gflops(size=256, repeats=1)
    assert peak["fp32_gflops"] > 0 and peak["int8_gops_onnxruntime"] > 0


def test_bench_clis_name_a_bad_integer_list(tiny_bundle, capsys):
    from posterrt.benchmarks import cache_curve, step_sweep

    with pytest.raises(SystemExit):
        cache_curve.main(["--bundle", str(tiny_bundle), "--intervals", "1,x"])
    assert "--intervals: expected comma-separated integers, got '1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_sweep.main(["--bundle", str(tiny_bundle), "--steps", "0,10"])
    assert "--steps: values must be >= 1" in capsys.readouterr().err
