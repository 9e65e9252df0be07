"""The background generator's components from diffusers / transformers folders on disk.

``posterrt export --from-pretrained unet=PATH vae=PATH text_encoder=PATH image_encoder=PATH
tokenizer=PATH`` names folders written by ``save_pretrained`` (or the root of a diffusers pipeline
folder holding ``unet/``, ``vae/``, ...). Nothing is downloaded: every load is
``local_files_only``. A folder that is missing, has no config, or holds another kind of model is
refused with a CheckpointError that names the component and what was expected, before any weight
is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from posterrt.runtime.errors import CheckpointError


@dataclass(frozen=True)
class Component:
    keys: tuple[str, ...]  # --from-pretrained names accepted, most specific first
    subfolder: str  # its folder inside a diffusers pipeline folder
    what: str  # what the folder must hold, for error messages
    config_file: str = "config.json"


COMPONENTS = {
    # bg_unet is the more specific name: RenderNet's UNet may come from another folder.
    "unet": Component(("bg_unet", "unet"), "unet", "a diffusers UNet2DConditionModel (SD 1.5 inpainting, 9 input channels)"),
    "vae": Component(("vae",), "vae", "a diffusers AutoencoderKL"),
    "text_encoder": Component(("text_encoder",), "text_encoder", "a transformers CLIPTextModel"),
    "image_encoder": Component(("image_encoder",), "image_encoder",
                               "a transformers CLIPVisionModelWithProjection or CLIPVisionModel"),
    "tokenizer": Component(("tokenizer",), "tokenizer", "a CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)",
                           "tokenizer_config.json"),
}


@dataclass(frozen=True)
class Folder:
    component: str
    flag: str  # "--from-pretrained unet=/path", for messages
    path: Path


def component_folder(pretrained: dict, component: str) -> Folder | None:
    """The folder given for ``component``, checked to exist and hold its config; None if not given."""
    spec = COMPONENTS[component]
    key = next((k for k in spec.keys if k in pretrained), None)
    if key is None:
        return None
    path = Path(pretrained[key]).expanduser()
    flag = f"--from-pretrained {key}={pretrained[key]}"
    if not path.is_dir():
        raise CheckpointError(f"{flag}: folder does not exist; expected {spec.what} folder")
    if not (path / spec.config_file).is_file():
        if (path / spec.subfolder / spec.config_file).is_file():  # the root of a pipeline folder
            path = path / spec.subfolder
        else:
            raise CheckpointError(f"{flag}: no {spec.config_file} in the folder; expected {spec.what} "
                                  f"folder written by save_pretrained")
    return Folder(component, flag, path)


def read_config(folder: Folder) -> dict:
    path = folder.path / COMPONENTS[folder.component].config_file
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder.flag}: {path.name} is not valid JSON ({error})") from None


def check_kind(folder: Folder, config: dict) -> None:
    """Refuse a folder that holds another kind of model than the component needs."""
    what = COMPONENTS[folder.component].what
    if folder.component == "unet":
        if config.get("_class_name") != "UNet2DConditionModel":
            raise CheckpointError(f"{folder.flag}: config is a {config.get('_class_name')!r}; expected {what}")
        if config.get("in_channels") != 9:
            raise CheckpointError(f"{folder.flag}: in_channels is {config.get('in_channels')}; bg_unet needs an "
                                  f"inpainting UNet with 9 (latent 4 + mask 1 + masked-image latent 4)")
    elif folder.component == "vae":
        if config.get("_class_name") != "AutoencoderKL":
            raise CheckpointError(f"{folder.flag}: config is a {config.get('_class_name')!r}; expected {what}")
    elif folder.component == "text_encoder":
        if config.get("model_type") != "clip_text_model":
            raise CheckpointError(f"{folder.flag}: model_type is {config.get('model_type')!r}; expected "
                                  f"'clip_text_model' ({what})")
    elif folder.component == "image_encoder":
        if config.get("model_type") != "clip_vision_model":
            raise CheckpointError(f"{folder.flag}: model_type is {config.get('model_type')!r}; expected "
                                  f"'clip_vision_model' ({what})")


def checked_config(pretrained: dict, component: str) -> tuple[Folder, dict] | None:
    folder = component_folder(pretrained, component)
    if folder is None:
        return None
    config = read_config(folder)
    check_kind(folder, config)
    return folder, config


def _load(folder: Folder, loader, **kwargs):
    try:
        model = loader(str(folder.path), local_files_only=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as error:  # missing or corrupt weight files raise many library-specific types
        message = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"{folder.flag}: cannot load {COMPONENTS[folder.component].what}: "
                              f"{type(error).__name__}: {message}") from None
    return model.float().eval()


def load_unet(folder: Folder):
    from diffusers import UNet2DConditionModel

    return _load(folder, UNet2DConditionModel.from_pretrained, torch_dtype=torch.float32)


def load_vae(folder: Folder):
    from diffusers import AutoencoderKL

    return _load(folder, AutoencoderKL.from_pretrained, torch_dtype=torch.float32)


def load_text_encoder(folder: Folder):
    from transformers import CLIPTextModel

    return _load(folder, CLIPTextModel.from_pretrained, dtype=torch.float32)


def image_encoder_has_projection(config: dict) -> bool:
    return "CLIPVisionModelWithProjection" in (config.get("architectures") or [])


def load_image_encoder(folder: Folder, config: dict):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    loader = CLIPVisionModelWithProjection if image_encoder_has_projection(config) else CLIPVisionModel
    return _load(folder, loader.from_pretrained, dtype=torch.float32)


def image_normalization(folder: Folder) -> tuple[list[float], list[float]] | None:
    """(mean, std) from the folder's preprocessor_config.json, when it has one."""
    path = folder.path / "preprocessor_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if "image_mean" in config and "image_std" in config:
        return list(config["image_mean"]), list(config["image_std"])
    return None


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


@lru_cache(maxsize=4)
def _auto_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)


def tokenizer_info(folder: Folder) -> TokenizerInfo:
    try:
        tokenizer = _auto_tokenizer(str(folder.path))
    except Exception as error:
        raise CheckpointError(f"{folder.flag}: cannot load {COMPONENTS['tokenizer'].what}: "
                              f"{type(error).__name__}: {error}") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"{folder.flag}: the tokenizer defines no bos/eos token; expected "
                              f"{COMPONENTS['tokenizer'].what}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizerInfo(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
