"""The distribution's shape: one `posterrt` namespace, and a runtime that imports without torch."""
import subprocess
import sys
import textwrap
from pathlib import Path

import posterrt.runtime


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    # A meta-path finder that refuses torch (and what drags it in) makes any import of it fail.
    blocker = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers", "torchvision"):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True)


def test_runtime_imports_without_torch():
    modules = ["posterrt.runtime.contracts", "posterrt.runtime.bundle", "posterrt.runtime.samples", "posterrt.runtime.profiles",
               "posterrt.runtime.backends.base", "posterrt.runtime.cli"]
    modules += ["posterrt.runtime.metrics", "posterrt.runtime.commands.eval_layout"]
    modules += ["posterrt.runtime.schedulers", "posterrt.runtime.schedulers.radm", "posterrt.runtime.schedulers.plannet"]
    modules += ["posterrt.runtime.backends.onnxruntime", "posterrt.runtime.backends.openvino", "posterrt.runtime.images", "posterrt.runtime.text", "posterrt.runtime.compose", "posterrt.runtime.layout_refine", "posterrt.runtime.pipelines.poster", "posterrt.runtime.pipelines.layout", "posterrt.runtime.pipelines.background", "posterrt.runtime.pipelines.render", "posterrt.runtime.commands.generate", "posterrt.runtime.commands.demo"]
    modules += ["posterrt.runtime.backends", "posterrt.runtime.backends.triton", "posterrt.runtime.triton.repository", "posterrt.runtime.triton.server", "posterrt.runtime.triton.shm", "posterrt.runtime.server_stages", "posterrt.runtime.backends.triton_stages", "posterrt.runtime.triton.stubs.plannet_sampler", "posterrt.runtime.triton.stubs.unet_sampler", "posterrt.runtime.triton.stubs.radm_layout", "posterrt.runtime.families", "posterrt.runtime.commands.repo", "posterrt.runtime.commands.serve", "posterrt.runtime.client"]
    modules += ["posterrt.runtime.accuracy", "posterrt.runtime.ssim"]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "import sys; assert 'torch' not in sys.modules; print('ok')"
    result = _run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_blocker_really_blocks_torch():
    result = _run_without_torch("import torch")
    assert result.returncode != 0 and "blocked torch" in result.stderr


def test_no_top_level_runtime_or_export_modules_installed():
    import importlib.util

    assert posterrt.runtime.__name__ == "posterrt.runtime"
    for name in ("runtime", "export", "engines"):
        spec = importlib.util.find_spec(name)
        # from a source checkout the cwd may expose the folders; never from site-packages
        assert spec is None or "site-packages" not in (spec.origin or "")


def test_cli_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("export", "generate", "serve", "repo", "engines", "bench"):
        assert command in result.stdout


def test_unknown_command_exits_2():
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_build_ships_the_demo_assets_without_a_setuptools_warning(tmp_path):
    """The wheel's runtime holds the demo's PNGs and no build script; setuptools has nothing to warn about."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "build_py", "-d", str(tmp_path)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "posterrt.runtime.assets" not in result.stdout + result.stderr
    assets = tmp_path / "posterrt" / "runtime" / "assets"
    assert sorted(p.name for p in assets.iterdir()) == ["logo.png", "product.png"]


def test_version_is_the_distributions():
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"posterrt {version('posterrt')}"
    assert "--version" in subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "--help"], capture_output=True,
                                         text=True).stdout


def _options(parser, prefix):
    """(command, option) for every option of ``parser`` and of its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield prefix, action


def test_every_option_of_every_command_says_what_it_does():
    import argparse
    import importlib

    from posterrt.runtime.cli import COMMANDS

    missing = []
    for name, (module, summary) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"posterrt {name}")
        importlib.import_module(module).add_arguments(parser)
        missing += [f"{command} {'/'.join(action.option_strings) or action.dest}"
                    for command, action in _options(parser, f"posterrt {name}") if not action.help]
    assert missing == []


def test_generate_help_shows_the_defaults():
    result = subprocess.run([sys.executable, "-m", "posterrt.runtime.cli", "generate", "--help"], capture_output=True,
                            text=True)
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for default in ("default 7.5", "(default ddim)", "(default 0)", "default 512x512", "--no-refine"):
        assert default in text, default


def test_what_the_demo_writes_is_ignored_by_git():
    import shutil

    import pytest

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("demo/poster.png", "posterrt-demo/poster.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0, path
    assert subprocess.run(["git", "check-ignore", "-q", "docs/demo-poster.png"], cwd=root).returncode == 1


def test_the_readme_examples_name_files_that_ship():
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    products = re.findall(r"--product\s+(\S+)", readme)
    assert products and all((root / product).is_file() for product in products), products
    commands = re.findall(r"posterrt generate (?:[^\n]*\\\n)*[^\n]*", readme)  # with \-continued lines
    complete = [c for c in commands if not c.rstrip().endswith("...")]  # "..." marks an abridged example
    assert complete and all("--out" in command for command in complete), [c for c in complete if "--out" not in c]
