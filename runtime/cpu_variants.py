"""Which CPU variant of each model posterrt runs when the user names none.

``posterrt engines optimize`` builds, gates and registers faster forms of a bundle's models
(``variants.<model>.<variant>`` in its manifest). Which form is fastest depends on the CPU
(benchmarks/RESULTS.md): on a Xeon with AMX, OpenVINO bf16 runs on AMX tiles and leads; on an
AVX-512 bf16 + VNNI CPU without AMX (the AMD EPYC), ONNX Runtime's int8 leads. So the CPU's *kind*
is read from its feature flags (``/proc/cpuinfo``; any other OS is ``generic``), and each kind has
an order of preference: :func:`default_variants` gives each model the first variant in that order
that the bundle registers with passing gates and that can load here. A UNet's feature-cache steps
run the UNet's pick (``Bundle.variant_for``), so a variant is a UNet's default only when the cached
steps the bundle holds have it too.

:func:`choose_variants` is the rule every entry point follows: no ``--variants`` = the default for
this CPU, ``--variants none`` = the exported fp32 files, an explicit list = exactly that list (the
models it does not name run their exported files).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .bundle import Bundle
from .contracts import parse_variant_list
from .errors import BundleError
from .families import cached_step_of, cached_steps, unet_families

CPUINFO = Path("/proc/cpuinfo")
#: ``--variants none``: serve the exported fp32 files, whatever the bundle holds.
NO_VARIANTS = "none"


def cpuinfo_value(key: str, path: Path = CPUINFO) -> str | None:
    """The value of the first ``key : value`` line of /proc/cpuinfo (Linux); None elsewhere."""
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (``avx512_bf16``, ``amx_bf16``, ...); empty
    where there is no /proc/cpuinfo or no ``flags`` line (other OSes, ARM's ``Features``)."""
    return frozenset((cpuinfo_value("flags", path) or "").split())


@dataclass(frozen=True)
class CpuKind:
    name: str
    needs: frozenset[str]  # a CPU is of this kind when it has every one of these flags
    order: tuple[str, ...]  # variants, preferred first
    basis: str  # where the order comes from: a section of benchmarks/RESULTS.md, or why there is none
    results_sections: tuple[str, ...] = field(default=(), compare=False)  # RESULTS.md headings it cites

    def matches(self, flags: Iterable[str]) -> bool:
        return self.needs <= set(flags)


#: The one place that ranks the variants, per CPU kind, most specific kind first. A new variant
#: (e.g. ``openvino-int8``) is placed by adding it to each kind's ``order`` where its measurements
#: put it. docs/engines.md has the same table with the figures.
CPU_KINDS = (
    # Xeon with AMX: openvino-bf16 4.65x / 4.84x torch eager fp32 (bg_unet / render_unet), ORT int8
    # 3.31x (its MLAS kernels do not use AMX), the fp32 forms ~1.5x. int8-dynamic and fp32-opt were
    # not timed there and keep the EPYC's places among the rest.
    # The NNCF int8 IRs were not timed there: after what was.
    CpuKind("amx", frozenset({"amx_bf16"}),
            ("openvino-bf16", "int8", "openvino-int8-bf16", "openvino-int8", "int8-dynamic", "openvino-fp32",
             "fp32-opt"),
            "measured on an Intel Xeon with AMX",
            ("Issue 8 on the current machine: Intel Xeon with AMX (2026-12-03)",
             "Target 1: UNet-class step (paper preset, batch 2, 32x32 latent, 2 threads)")),
    # AVX-512 bf16 + VNNI without AMX (AMD EPYC): at the posters' 512 px the bg_unet step is fastest as
    # openvino-int8-bf16, then openvino-int8, then ORT int8 (Zen 5; at 256 px ORT int8 leads);
    # openvino-bf16 the one render_unet form that passes its gate; int8-dynamic 3.26x (bg_unet, Zen 4),
    # OpenVINO fp32 the fastest fp32, fp32-opt = plain ORT.
    CpuKind("avx512-bf16-vnni", frozenset({"avx512_bf16", "avx512_vnni"}),
            ("openvino-int8-bf16", "openvino-int8", "int8", "openvino-bf16", "int8-dynamic", "openvino-fp32",
             "fp32-opt"),
            "measured on AMD EPYCs (AVX-512 bf16 + VNNI, no AMX: Zen 4 and Zen 5)",
            ("UNet-class step", "Levers: what won, what lost, and why",
             "Issue 18 at paper size: AMD EPYC Zen 5 (2026-12-05)")),
    # Nothing measured without avx512_bf16 / VNNI: only the exact variants (same numbers as the
    # export). The approximate ones were gated on the CPU that built them, and int8's U8S8 kernels
    # can overflow on x86 cores without VNNI (onnxruntime#12088), so they are never a default here.
    CpuKind("generic", frozenset(), ("openvino-fp32", "fp32-opt"),
            "not measured on such a CPU: exact variants only, OpenVINO fp32 first as on both measured CPUs"),
)


def detect_cpu(flags: Iterable[str] | None = None) -> CpuKind:
    """The kind of this CPU (or of the CPU with ``flags``)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return next(kind for kind in CPU_KINDS if kind.matches(flags))


def cpu_kind(name: str) -> CpuKind:
    for kind in CPU_KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"unknown CPU kind {name!r}")


def why_not(bundle: Bundle, model: str, variant: str, onnx_only: bool = False) -> str | None:
    """Why ``variant`` of ``model`` cannot be a default here (None: it can): not registered, a gate
    not passed, made from another export, missing files, OpenVINO not installed for an IR, or an
    IR where only ONNX can run (``onnx_only``: a server stage that runs ONNX Runtime drives it)."""
    from .backends import openvino

    entry = bundle.variants(model).get(variant)
    if entry is None:
        return "not built"
    failed = _failed_gate(entry)
    if failed:
        return failed
    try:
        bundle.model_path(model, verify=False, variant=variant)
    except BundleError as error:
        return str(error)
    if openvino.is_openvino_ir(entry["file"]):
        if onnx_only:
            return "an OpenVINO IR, and a server stage runs this model with ONNX Runtime"
        if not openvino.openvino_installed():
            return "OpenVINO is not installed"
    # a UNet's feature-cache steps run its variant (Bundle.variant_for): a default must cover them too,
    # or a request that caches would fail
    for step in (cached_steps(model) if model in unet_families() else ()):
        reason = why_not(bundle, step, variant, onnx_only) if step in bundle.models else None
        if reason:
            return f"its cached step {step}: {reason}"
    return None


def _failed_gate(entry: dict) -> str | None:
    """Both gates of ``posterrt engines optimize`` must have passed (the pipeline gate may be skipped
    when the bundle lacks a pipeline's other models)."""
    if entry.get("gate", {}).get("passed") is not True:
        return "its quality gate did not pass"
    pipeline = entry.get("pipeline_gate", {})
    if "skipped" not in pipeline and pipeline.get("gate", {}).get("passed") is not True:
        return "its pipeline gate did not pass"
    return None


def default_variants(bundle: Bundle, cpu: CpuKind | None = None, models: Iterable[str] | None = None,
                     onnx_only: Iterable[str] = ()) -> dict[str, str]:
    """``{model: variant}``: for each of ``models`` (default: every model of the bundle), the first
    variant in ``cpu``'s order (default: this CPU's kind) that :func:`why_not` lets through. Models
    with none are left out: they run their exported files."""
    cpu = cpu or detect_cpu()
    onnx_only = set(onnx_only)
    picks = {}
    for model in bundle.models if models is None else models:
        if cached_step_of(model) is not None:
            continue  # runs its UNet's pick
        for variant in cpu.order:
            if why_not(bundle, model, variant, model in onnx_only) is None:
                picks[model] = variant
                break
    return picks


@dataclass(frozen=True)
class VariantChoice:
    """The variants an entry point serves, and why: ``how`` is ``default`` (this CPU's kind picked
    them), ``given`` (an explicit list) or ``none`` (``--variants none``)."""
    variants: dict[str, str]
    how: str
    cpu: CpuKind | None = None
    flags: frozenset[str] = frozenset()

    def line(self, flag: str = "--variants") -> str:
        """One line for the user: what runs and why. ``flag``: how the user overrides it (the CLI's
        ``--variants``, or the API's ``variants`` argument)."""
        picked = ", ".join(f"{m}={v}" for m, v in sorted(self.variants.items())) or "none"
        off = f"{flag} {NO_VARIANTS}" if flag.startswith("--") else f"{flag}={{}}"
        if self.how == "default":
            seen = ", ".join(sorted(self.cpu.needs & self.flags)) or "no AMX, no AVX-512 bf16 + VNNI"
            kind = f"this CPU is kind {self.cpu.name}: {seen}"
            why = (f"the default: {kind}; {off} for the exported fp32 files" if self.variants else
                   f"{kind}; the bundle has no gated variant that kind runs by default")
        else:
            why = f"as given by {flag}" if self.how == "given" else off
        rest = "; other models run their exported fp32 files" if self.variants else ": the exported fp32 files"
        return f"variants: {picked} ({why}){rest}"

    def record(self) -> dict:
        """The same as JSON, for reports."""
        document = {"variants": dict(self.variants), "chosen": self.how}
        if self.cpu is not None:
            document["cpu_kind"] = self.cpu.name
        return document


def choose_variants(bundle: Bundle, text: str | None, flag: str = "--variants", models: Iterable[str] | None = None,
                    onnx_only: Iterable[str] = (), flags: Iterable[str] | None = None) -> VariantChoice:
    """The CLI's ``--variants`` value -> what to serve: None = :func:`default_variants` for this CPU
    (or the CPU with ``flags``) over ``models``; ``none`` = nothing; else the list as written."""
    if text is not None and text.strip().lower() == NO_VARIANTS:
        return VariantChoice({}, "none")
    if text is not None:
        return VariantChoice(parse_variant_list(text, flag), "given")
    flags = cpu_flags() if flags is None else frozenset(flags)
    cpu = detect_cpu(flags)
    return VariantChoice(default_variants(bundle, cpu, models, onnx_only), "default", cpu, flags)
