"""Weights from local files only: safetensors, or a PyTorch state dict loaded with ``weights_only=True``
(never unpickling code). A tensor whose name or shape does not fit the config is refused by name."""
from __future__ import annotations

from pathlib import Path

import torch

from posterrt.runtime.errors import CheckpointError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (Detectron2's
    ``{"model": {...}}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated files raise many library-specific types
        # One line: unpickling refusals carry multi-line advice that names torch internals.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(error).__name__}: {first_line}") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
              ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``: every parameter/buffer must be present with the same shape.

    ``ignore_unexpected`` lists key prefixes the checkpoint may carry that inference does not use
    (training-only heads, optimizer leftovers)."""
    expected = module.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"checkpoint {source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {tuple(expected[name].shape)}")
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected and not n.startswith(ignore_unexpected)]
    if missing:
        raise CheckpointError(f"checkpoint {source}: missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint {source}: unexpected tensor {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + " (a checkpoint of another network?)")
    module.load_state_dict({n: t for n, t in state.items() if n in expected}, strict=True)


def save_safetensors(module: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in module.state_dict().items()}, str(path))
