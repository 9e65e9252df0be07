"""Capacity on paper: how many replicas, and how many posters in flight per replica, for a target
load (posters per second) and a p99 latency, from a replica's service times.

A model, not a measurement. Its inputs are measured figures (this repository's bench JSON in
benchmarks/results/) or published ones (labeled as such, with their source), and its assumptions
are printed with every result:

1. A replica serves ``slots`` posters at once: CPU, one slot per ``threads`` cores (each slot's
   models run with that many threads, as measured); GPU, the dynamic batcher's batch size ``b``,
   the ``b`` posters of a batch advancing together and taking the batch's time.
2. A poster holds its slot for its service time S; arrivals are Poisson (M/G/c). The probability of
   waiting is Erlang C's; the waiting time is M/M/c's scaled by (1 + cs^2) / 2 (Allen-Cunneen),
   cs the service time's coefficient of variation, taken from its p50 and p99 as if normal. Diffusion
   pipelines take a nearly constant time per poster (cs ~ 0.03), so they wait about half as long
   as exponential service would.
3. Requests are spread evenly over replicas (the client's round robin, the Service).
4. p99 latency = the p99 service time + the 99th percentile of the Erlang-C waiting time.
5. Utilization per replica is capped at ``rho_max`` (default 0.8): headroom for a pod restarting or
   drained (the PodDisruptionBudget lets one go at a time) and for load the HPA has not caught up with.

``python -m posterrt.benchmarks.capacity`` prints the tables recorded in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Profile:
    """What one replica does with one poster."""

    name: str
    source: str  # "measured: <file and command>" or "published: <where>"
    service_p50_s: float  # one poster in its slot (GPU: the time of the batch it is part of)
    service_p99_s: float
    slots: int  # posters in flight per replica (GPU: the batch size)
    replica: str  # what one replica is (cores, GPU)


@dataclass(frozen=True)
class Plan:
    profile: str
    target_posters_s: float
    target_p99_s: float
    replicas: int | None  # None: no replica count meets the p99 (the service time alone exceeds it)
    per_replica_posters_s: float = 0.0
    utilization: float = 0.0
    p99_s: float = 0.0
    note: str = ""


def erlang_c(slots: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered`` = lambda * S erlangs."""
    if offered >= slots:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, slots):
        term *= offered / k
        total += term
    last = term * offered / slots / (1 - offered / slots)
    return last / (total + last)


def wait_quantile(slots: int, service_s: float, arrivals_s: float, q: float = 0.99, cs2: float = 1.0) -> float:
    """The q-quantile of the waiting time: P(W > t) = C * exp(-(c/S - lambda) t * 2 / (1 + cs2))
    (M/M/c's tail for cs2 = 1)."""
    waiting = erlang_c(slots, arrivals_s * service_s)
    if waiting <= 1 - q:
        return 0.0
    return math.log(waiting / (1 - q)) / (slots / service_s - arrivals_s) * (1 + cs2) / 2


def service_cs2(profile: "Profile") -> float:
    """Squared coefficient of variation of the service time, from p50 and p99 (normal: p99 = p50 + 2.33 sd)."""
    return ((profile.service_p99_s - profile.service_p50_s) / 2.326 / profile.service_p50_s) ** 2


def plan(profile: Profile, posters_s: float, p99_s: float, rho_max: float = 0.8, max_replicas: int = 10_000) -> Plan:
    """The fewest replicas whose utilization stays under ``rho_max`` and whose p99 meets ``p99_s``."""
    if profile.service_p99_s >= p99_s:
        return Plan(profile.name, posters_s, p99_s, None,
                    note=f"one poster alone takes {profile.service_p99_s:.2f} s at p99")
    capacity = profile.slots / profile.service_p50_s  # posters/s of one replica at full utilization
    replicas = max(1, math.ceil(posters_s / (rho_max * capacity)))
    while replicas <= max_replicas:
        arrivals = posters_s / replicas
        utilization = arrivals * profile.service_p50_s / profile.slots
        p99 = profile.service_p99_s + wait_quantile(profile.slots, profile.service_p50_s, arrivals,
                                                    cs2=service_cs2(profile))
        if utilization <= rho_max and p99 <= p99_s:
            return Plan(profile.name, posters_s, p99_s, replicas, posters_s / replicas, utilization, p99)
        replicas += 1
    return Plan(profile.name, posters_s, p99_s, None, note=f"more than {max_replicas} replicas")


# --- profiles from the repository's measurements ---------------------------------------------------
def _json(relative: str) -> dict:
    path = RESULTS / relative
    if not path.is_file():  # the recorded results live in a checkout, not in an installed wheel
        raise SystemExit(f"capacity: {path} not found: run from a posterrt checkout (pip install -e .) "
                         f"or pass --results <checkout>/benchmarks/results")
    return json.loads(path.read_text())


def set_results(folder: Path) -> None:
    global RESULTS
    RESULTS = Path(folder)


def cpu_tiny_profile(pipeline: str = "render", cores: int = 2, results: str = "serving/bench.json") -> Profile:
    """The tiny preset over Triton gRPC on this machine: the pipeline's measured end-to-end time
    at one client, and the measured scaling of a compute-bound model with one instance per core
    (radm_head, 2 instances: requests/s at 4 clients over 1 client) for the slots."""
    data = _json(results)
    stage = next(s for s in data["stages"] if s["pipeline"] == pipeline and s["stage"] == "end_to_end"
                 and s["backend"] == "triton-grpc")
    rps = {t["concurrency"]: t["rps"] for t in data["throughput"] if t["model"] == "radm_head" and t["config"] == "batching"}
    scaling = rps[max(rps)] / rps[1] / data["machine"]["cores"]  # 1.0: cores add throughput linearly
    return Profile(f"cpu tiny {pipeline}", f"measured: benchmarks/results/{results} ({data['command']}; "
                   f"{data['machine']['cpu']}, {data['date'][:10]})",
                   stage["p50_ms"] / 1e3 / scaling, stage["p99_ms"] / 1e3 / scaling, slots=cores,
                   replica=f"{cores} cores, 1 thread per model instance")


def cpu_paper_profile(steps: int = 50, cores: int = 16, variant: str = "ort-int8-iobinding",
                      results: str = "paper/unet_step/unet_step-bg_unet.json") -> Profile:
    """The paper background stage on this machine: ``steps`` measured UNet steps (batch 2 = the
    guidance pair, 2 threads) and the measured VAE decoder (paper/bench.json, ONNX Runtime). Step
    jitter is taken as independent across steps (the p99 excess grows with sqrt(steps))."""
    step = _json(results)
    row = next(r for r in step["rows"] if r["candidate"] == variant)
    decoder = next(m for m in _json("paper/bench.json")["models"] if m["model"] == "vae_decoder" and m["batch"] == 1)
    decode_s = decoder["gflop"] / decoder["ort_gflops"]
    p50 = steps * row["p50_ms"] / 1e3 + decode_s
    p99 = p50 + math.sqrt(steps) * (row["p99_ms"] - row["p50_ms"]) / 1e3
    threads = step["threads"]
    return Profile(f"cpu paper background ({variant}, {steps} steps)",
                   f"measured: benchmarks/results/{results} ({step['command']}; {step['machine']['cpu']}) and "
                   f"benchmarks/results/paper/bench.json (vae_decoder)", p50, p99, slots=cores // threads,
                   replica=f"{cores} cores, {threads} threads per slot")


#: Published GPU pipeline times for Stable Diffusion 1.5 at 512x512, 50 steps, median seconds per
#: batch. bg_unet has SD 1.5's UNet (docs: networks), so these stand for the background stage at
#: 512 px. Not measured here: no GPU was available to this work.
PUBLISHED_GPU = [
    {"gpu": "V100", "engine": "ONNX Runtime 1.14 CUDA EP, fp16", "times_s": {1: 2.7, 4: 8.3, 8: 15.7},
     "source": "microsoft/onnxruntime, onnxruntime/python/tools/transformers/models/stable_diffusion/README.md "
               "(commit 0b269f0, 'Results of V100')"},
    {"gpu": "A100-SXM4-40GB", "engine": "TensorRT 8.6.1, fp16", "times_s": {1: 0.98},
     "source": "alexeigor/sd-benchmarks README.md (third-party)"},
    {"gpu": "H100 PCIe", "engine": "TensorRT 8.6.1, fp16", "times_s": {1: 0.75},
     "source": "alexeigor/sd-benchmarks README.md (third-party)"},
]


def gpu_profiles(p99_spread: float = 1.05) -> list[Profile]:
    """One profile per published (GPU, batch); p99 taken as ``p99_spread`` x the median (the
    sources give medians/means only: an assumption)."""
    return [Profile(f"gpu {entry['gpu']} {entry['engine']} batch {batch}", f"published: {entry['source']}",
                    seconds, seconds * p99_spread, slots=batch, replica=f"1 {entry['gpu']}")
            for entry in PUBLISHED_GPU for batch, seconds in entry["times_s"].items()]


def table(plans: list[Plan], profiles: dict[str, Profile]) -> str:
    lines = ["| profile | replica | per-poster S p50 / p99 (s) | slots | target posters/s | target p99 (s) | "
             "replicas | posters/s per replica | utilization | model p99 (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        prof = profiles[p.profile]
        got = (f"{p.replicas} | {p.per_replica_posters_s:.3g} | {p.utilization:.2f} | {p.p99_s:.2f}"
               if p.replicas else f"none | - | - | {p.note}")
        lines.append(f"| {p.profile} | {prof.replica} | {prof.service_p50_s:.2f} / {prof.service_p99_s:.2f} | "
                     f"{prof.slots} | {p.target_posters_s:g} | {p.target_p99_s:g} | {got} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posterrt.benchmarks.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--rho-max", type=float, default=0.8, help="utilization cap per replica (default 0.8)")
    parser.add_argument("--paper-cores", type=int, default=16, help="cores of a paper-size CPU replica (default 16)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of a paper poster (default 50)")
    parser.add_argument("--out", type=Path, help="also write the plans and profiles as JSON here")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the recorded bench results to read the measured profiles from (default: this checkout's)")
    args = parser.parse_args(argv)
    set_results(args.results)
    cases = [(cpu_tiny_profile("render"), [(1, 1.0), (10, 1.0), (50, 1.0)]),
             (cpu_paper_profile(args.steps, args.paper_cores), [(0.1, 120), (1, 120), (1, 60)])]
    cases += [(profile, [(1, 10), (10, 10), (10, 30)]) for profile in gpu_profiles()]
    profiles = {profile.name: profile for profile, _ in cases}
    plans = [plan(profile, load, p99, args.rho_max) for profile, targets in cases for load, p99 in targets]
    print(table(plans, profiles))
    print("\nsources:")
    for profile in profiles.values():
        print(f"- {profile.name}: {profile.source}")
    if args.out:
        args.out.write_text(json.dumps({"rho_max": args.rho_max, "profiles": [asdict(p) for p in profiles.values()],
                                        "plans": [asdict(p) for p in plans]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
