"""Soak: 2,000 requests at concurrency 8 against a real tritonserver on 127.0.0.1 (the CI version,
a few seconds each over gRPC and HTTP), every answer checked against ONNX Runtime in-process,
server and client memory watched. The full soak (whole pipelines, more requests) is the command
``python -m posterrt.benchmarks.soak`` (see benchmarks/RESULTS.md, Reliability); the test marked
slow runs it when POSTERRT_SOAK_FULL=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posterrt.benchmarks import soak

pytestmark = pytest.mark.triton

#: RSS growth allowed after the warm-up, per side. Measured growth is 0-3 MB (benchmarks/RESULTS.md);
#: a leak of 10 KB per request would show 20 MB over 2,000 requests.
MAX_GROWTH_MB = 16.0


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    reuse = os.environ.get("POSTERRT_TEST_BUNDLE")
    return Path(reuse) if reuse else request.getfixturevalue("tiny_bundle")


def assert_clean(report: dict, requests: int) -> None:
    summary = "\n".join(soak.summary_lines(report))
    assert report["completed"] == requests and report["submitted"] == requests, summary
    assert report["failed"] == 0 and report["wrong"] == 0, summary
    assert not report["stopped_early"], summary
    for side in ("server", "client"):
        memory = report["rss"][side]
        assert memory is not None, f"no {side} RSS measured"
        assert memory["growth_mb"] <= MAX_GROWTH_MB, f"{side} RSS grew {memory['growth_mb']} MB:\n{summary}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ci_soak_2000_requests_at_concurrency_8(bundle_dir, tmp_path, protocol):
    config = soak.SoakConfig(bundle=bundle_dir, requests=2000, concurrency=8, model="plannet_denoiser",
                             protocol=protocol, sample_every_s=0.5, max_seconds=120)
    report = soak.run_soak(config, log=lambda line: None)
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2))
    print("\n".join(soak.summary_lines(report)))
    assert_clean(report, 2000)
    assert report["rss"]["server"]["start_mb"] > 20, "the server's RSS should include tritonserver and its stub"


def test_the_soak_counts_wrong_answers_and_stops_at_its_time_limit(bundle_dir, monkeypatch):
    monkeypatch.setattr(soak, "MODEL_REL_TOL", -1.0)  # every answer now differs "too much"
    config = soak.SoakConfig(bundle=bundle_dir, requests=50, concurrency=4, model="radm_text_encoder", distinct=4)
    report = soak.run_soak(config, log=lambda line: None)
    assert report["completed"] == 50 and report["wrong"] == 50 and report["failed"] == 0
    assert report["errors"] and "relative error" in report["errors"][0]

    monkeypatch.setattr(soak, "MODEL_REL_TOL", 1e-5)
    bounded = soak.run_soak(soak.SoakConfig(bundle=bundle_dir, requests=10**6, concurrency=2,
                                            model="radm_text_encoder", distinct=2, max_seconds=1.0),
                            log=lambda line: None)
    assert bounded["stopped_early"] and 0 < bounded["completed"] < 10**6 and bounded["wrong"] == 0


def test_soak_command_runs_a_pipeline_and_writes_json(bundle_dir, tmp_path):
    out = tmp_path / "soak_layout.json"
    result = subprocess.run([sys.executable, "-m", "posterrt.benchmarks.soak", "--bundle", str(bundle_dir),
                             "--pipeline", "layout", "--requests", "24", "--concurrency", "4", "--distinct", "3",
                             "--steps", "1", "--protocol", "http", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["completed"] == 24 and report["failed"] == 0 and report["wrong"] == 0
    assert report["models"] == ["radm_backbone", "radm_head", "radm_text_encoder"]
    assert "requests: 24/24 completed, 0 failed, 0 wrong" in result.stdout


def test_cancelled_and_deadline_bound_requests_end_as_asked_and_the_others_stay_right(bundle_dir):
    """A quarter of the requests cancelled after their first step, a quarter under a deadline shorter
    than they take (the background pipeline's server stage over gRPC streaming): none lost, none
    wrong, every one ends cancelled, past its deadline or with the in-process answer."""
    config = soak.SoakConfig(bundle=bundle_dir, requests=40, concurrency=4, model=None, pipeline="background",
                             distinct=3, steps=4, cancel_share=0.25, deadline_share=0.25, deadline_s=0.05,
                             max_seconds=240)
    report = soak.run_soak(config, log=lambda line: None)
    summary = "\n".join(soak.summary_lines(report))
    assert report["failed"] == 0 and report["wrong"] == 0 and not report["stopped_early"], summary
    assert report["completed"] + report["cancelled"] + report["deadline_exceeded"] == 40, summary
    assert report["cancelled"] >= 8 and report["deadline_exceeded"] >= 8, summary
    assert report["server_answers"], summary


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("POSTERRT_SOAK_FULL"), reason="the full soak: set POSTERRT_SOAK_FULL=1")
@pytest.mark.parametrize("workload", [{"model": "plannet_denoiser", "requests": 20000},
                                      {"model": None, "pipeline": "layout", "requests": 2000}],
                         ids=["plannet_denoiser-20000", "layout-pipeline-2000"])
def test_full_soak(bundle_dir, workload):
    config = soak.SoakConfig(bundle=bundle_dir, concurrency=8, max_seconds=1800, **workload)
    report = soak.run_soak(config)
    print("\n".join(soak.summary_lines(report)))
    assert_clean(report, workload["requests"])
