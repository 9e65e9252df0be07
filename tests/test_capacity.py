"""The capacity model (benchmarks/capacity.py): its queueing formulas against textbook values, the
fewest replicas that meet a target, and its profiles read from the repository's recorded results."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from posterrt.benchmarks import capacity
from posterrt.benchmarks.capacity import Profile, erlang_c, plan, wait_quantile


def test_erlang_c_and_waiting_tail_match_textbook_values():
    assert erlang_c(1, 0.3) == pytest.approx(0.3)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # c = 2, A = 1 erlang
    assert erlang_c(4, 4.5) == 1.0  # overloaded: everyone waits
    # M/M/1, S = 1 s, lambda = 0.5/s: P(W > t) = 0.5 exp(-0.5 t) -> t99 = 2 ln 50
    assert wait_quantile(1, 1.0, 0.5) == pytest.approx(2 * math.log(50))
    assert wait_quantile(1, 1.0, 0.5, cs2=0.0) == pytest.approx(math.log(50))  # constant service waits half
    assert wait_quantile(8, 1.0, 0.5) == 0.0  # almost never waits


def test_plan_is_the_fewest_replicas_that_meet_the_target():
    profile = Profile("test", "test", service_p50_s=2.0, service_p99_s=2.2, slots=2, replica="test")
    result = plan(profile, posters_s=5.0, p99_s=4.0, rho_max=0.8)
    assert result.replicas is not None and result.utilization <= 0.8 and result.p99_s <= 4.0
    assert result.per_replica_posters_s == pytest.approx(5.0 / result.replicas)
    fewer = Profile("test", "test", 2.0, 2.2, 2, "test")
    arrivals = 5.0 / (result.replicas - 1)
    worse_p99 = 2.2 + wait_quantile(2, 2.0, arrivals, cs2=capacity.service_cs2(fewer))
    assert arrivals * 2.0 / 2 > 0.8 or worse_p99 > 4.0, "one replica fewer would also meet the target"
    assert plan(profile, 1.0, 2.0).replicas is None and "2.20 s at p99" in plan(profile, 1.0, 2.0).note


@pytest.fixture
def checkout_results(monkeypatch):
    """The checkout's recorded results (CI installs posterrt as a wheel, which does not carry them)."""
    monkeypatch.setattr(capacity, "RESULTS", Path(__file__).resolve().parents[1] / "benchmarks" / "results")


def test_profiles_come_from_recorded_results_and_published_figures_are_labeled(checkout_results, capsys):
    tiny = capacity.cpu_tiny_profile("render")
    assert tiny.source.startswith("measured: benchmarks/results/serving/bench.json") and 0.1 < tiny.service_p50_s < 2
    paper = capacity.cpu_paper_profile(steps=50, cores=16)
    assert paper.slots == 8 and paper.service_p50_s > 50 * 0.5  # 50 UNet steps of ~0.7 s each
    assert all(p.source.startswith("published: ") for p in capacity.gpu_profiles())
    assert capacity.main(["--results", str(capacity.RESULTS)]) == 0
    out = capsys.readouterr().out
    assert "| cpu tiny render |" in out and "published: microsoft/onnxruntime" in out


def test_results_missing_is_one_line_naming_the_folder(tmp_path):
    with pytest.raises(SystemExit, match="not found: run from a posterrt checkout"):
        capacity.main(["--results", str(tmp_path)])
