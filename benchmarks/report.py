"""Write a benchmark run as JSON (every figure), a Markdown table, and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(markdown(results))
    paths.update(plot(results, out))
    return paths


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    machine = results.get("machine", {})
    peak = machine.get("peak", {})
    lines = [f"# posterrt bench: preset {results.get('preset')}, image {results.get('image_size')}px",
             "", f"Command: `{results.get('command')}`  ", f"Date: {results.get('date')}  ",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; measured GEMM peak "
             f"fp32 {_fmt(peak.get('fp32_gflops'), 0)} GFLOP/s, bf16 {_fmt(peak.get('bf16_gflops_torch'), 0)} GFLOP/s  ",
             f"Libraries: {', '.join(f'{k} {v}' for k, v in machine.get('libraries', {}).items())}", ""]
    if results.get("models"):
        backends = sorted({b for row in results["models"] for b in row["latency"]})
        lines += ["## Per model (one call, p50 ms)", "",
                  "| model | batch | GFLOP | " + " | ".join(f"{b} ms | {b} GFLOP/s" for b in backends)
                  + " | ort speed-up vs torch | openvino speed-up vs torch |",
                  "|---|---|---|" + "---|---|" * len(backends) + "---|---|"]
        for row in results["models"]:
            cells = []
            for backend in backends:
                stats = row["latency"].get(backend)
                cells += [_fmt(stats and stats["p50_ms"], 2), _fmt(row.get(f"{backend}_gflops"), 1)]
            lines.append(f"| {row['model']} | {row['batch']} | {row['gflop']:.3f} | " + " | ".join(cells)
                         + f" | {_fmt(row.get('ort_speedup_vs_torch'), 2)}x | {_fmt(row.get('openvino_speedup_vs_torch'), 2)}x |")
        lines.append("")
    if results.get("stages"):
        lines += ["## Per pipeline stage (ms)", "",
                  "| pipeline | stage | backend | p50 | p90 | p99 | ratio to embedded |", "|---|---|---|---|---|---|---|"]
        for row in results["stages"]:
            lines.append(f"| {row['pipeline']} | {row['stage']} | {row['backend']} | {_fmt(row['p50_ms'])} | "
                         f"{_fmt(row['p90_ms'])} | {_fmt(row['p99_ms'])} | {_fmt(row.get('ratio_to_embedded'), 3)} |")
        lines.append("")
    if results.get("throughput"):
        lines += ["## Throughput against concurrency", "",
                  "| model | dynamic batching | concurrency | requests/s | p50 ms | p99 ms | batched executions |",
                  "|---|---|---|---|---|---|---|"]
        for row in results["throughput"]:
            lines.append(f"| {row['model']} | {'on' if row['dynamic_batching'] else 'off'} | {row['concurrency']} | "
                         f"{_fmt(row['rps'], 1)} | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | "
                         f"{row.get('inferences', '-')}/{row.get('executions', '-')} |")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: the JSON and table carry every figure
        return {}
    paths = {}
    if results.get("models"):
        rows = results["models"]
        backends = sorted({b for row in rows for b in row["latency"]})
        labels = [f"{r['model']}\nb{r['batch']}" for r in rows]
        figure, axis = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4.5))
        width = 0.8 / max(1, len(backends))
        for index, backend in enumerate(backends):
            values = [r["latency"].get(backend, {}).get("p50_ms", 0) for r in rows]
            axis.bar([i + index * width for i in range(len(rows))], values, width, label=backend)
        axis.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(rows))], labels, rotation=60, fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel("p50 latency, ms (log)")
        axis.set_title(f"Per-model latency, preset {results.get('preset')}")
        axis.legend()
        figure.tight_layout()
        paths["models_png"] = out / "latency_models.png"
        figure.savefig(paths["models_png"], dpi=120)
        plt.close(figure)
    if results.get("stages"):
        rows = results["stages"]
        keys = list(dict.fromkeys(f"{r['pipeline']}:{r['stage']}" for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        figure, axis = plt.subplots(figsize=(max(8, len(keys) * 1.0), 4.5))
        width = 0.8 / max(1, len(backends))
        for index, backend in enumerate(backends):
            lookup = {f"{r['pipeline']}:{r['stage']}": r["p50_ms"] for r in rows if r["backend"] == backend}
            axis.bar([i + index * width for i in range(len(keys))], [lookup.get(k, 0) for k in keys], width, label=backend)
        axis.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(keys))], keys, rotation=45, fontsize=7, ha="right")
        axis.set_ylabel("p50 latency, ms")
        axis.set_title("Latency per pipeline stage")
        axis.legend()
        figure.tight_layout()
        paths["stages_png"] = out / "latency_stages.png"
        figure.savefig(paths["stages_png"], dpi=120)
        plt.close(figure)
    if results.get("throughput"):
        rows = results["throughput"]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for model in dict.fromkeys(r["model"] for r in rows):
            for batching in (True, False):
                series = sorted((r["concurrency"], r["rps"]) for r in rows if r["model"] == model and r["dynamic_batching"] == batching)
                if series:
                    axis.plot(*zip(*series), marker="o", linestyle="-" if batching else "--",
                              label=f"{model} ({'dynamic batching' if batching else 'no batching'})")
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("requests / s")
        axis.set_title("Throughput against concurrency (Triton gRPC)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths["throughput_png"] = out / "throughput.png"
        figure.savefig(paths["throughput_png"], dpi=120)
        plt.close(figure)
    return paths
