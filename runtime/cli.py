"""The `posterrt` command. Each subcommand lives in the package that owns its work and is imported
only when invoked, so `posterrt generate` never loads torch and `posterrt export` does."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PosterRTError

# name -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "export": ("posterrt.export.cli", "export served models to an ONNX bundle with a parity report (needs torch)"),
    "generate": ("posterrt.runtime.commands.generate", "make a poster (or a layout / background / render) from a product image"),
    "demo": ("posterrt.runtime.commands.demo", "build the tiny bundle if absent and make a poster from a bundled product"),
    "repo": ("posterrt.runtime.commands.repo", "build a Triton model repository from a bundle, push it to an object store, reload a fleet"),
    "serve": ("posterrt.runtime.commands.serve", "start tritonserver on a model repository (127.0.0.1)"),
    "deploy": ("posterrt.runtime.commands.deploy", "write Kubernetes manifests for a Triton fleet serving an object-store repository"),
    "engines": ("posterrt.engines.cli", "build TensorRT engines from a bundle, refit them, inspect manifests"),
    "bench": ("posterrt.benchmarks.cli", "benchmark models, stages and serving; write JSON, tables, plots"),
    "eval-layout": ("posterrt.runtime.commands.eval_layout", "layout quality metrics over generated layouts"),
}


def version() -> str:
    """The installed distribution's version (pyproject.toml), or a note when run from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("posterrt")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posterrt", description="Deployment runtime for e-commerce poster generation.")
    parser.add_argument("--version", action="version", version=f"posterrt {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(f"posterrt {version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
    module_name, summary = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        print(f"error: `posterrt {name}` needs {error.name!r}, which is not installed "
              f"(install posterrt[export] for export)", file=sys.stderr)
        return 2
    command = argparse.ArgumentParser(prog=f"posterrt {name}", description=summary)
    module.add_arguments(command)
    args = command.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except PosterRTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
