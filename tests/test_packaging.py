"""The distribution's shape: one `posterrt` namespace, and a runtime that imports without torch."""
import subprocess
import sys
import textwrap

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
    modules += ["posterrt.runtime.backends.onnxruntime", "posterrt.runtime.backends.openvino", "posterrt.runtime.images", "posterrt.runtime.text", "posterrt.runtime.compose", "posterrt.runtime.pipelines.poster", "posterrt.runtime.pipelines.layout", "posterrt.runtime.pipelines.background", "posterrt.runtime.pipelines.render", "posterrt.runtime.commands.generate", "posterrt.runtime.commands.demo"]
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
