"""diffusers model directories of any registered family: ``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded index (diffusers' ``save_pretrained``
layout), read and written. Safetensors only: nothing is unpickled.

Reading checks, in this order, before any tensor is loaded: the config file (JSON, a
``_class_name`` of a registered family: ``models.families.family_for_diffusers_class``),
the family's config (its own validation), the index (its files inside the directory),
and every tensor's name and shape from the safetensors *headers* against those the config
implies (``family.diffusers_shapes``): a tensor the config implies but the weights lack is
refused by name, so a small directory whose config claims a huge table cannot make the
loader build it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_apt.checkpoint.io import check_keys_match
from megatron_apt.models.families import ModelFamily, family_for_diffusers_class
from megatron_apt.utils.paths import atomic_directory, contained, read_json_object

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def model_dir(path: str | Path) -> Path:
    """The model directory of ``path``: itself, or its ``transformer/`` (a pipeline root)."""
    d = Path(path)
    if not (d / "config.json").is_file() and (d / "transformer" / "config.json").is_file():
        d = d / "transformer"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (not a diffusers model directory)")
    return d


def read_config(path: str | Path) -> tuple[ModelFamily, object, dict, Path]:
    """``(family, our config, config.json dict, model dir)`` of a diffusers directory:
    ``ValueError`` naming the config file for bad JSON, an unknown ``_class_name`` or a
    config the family does not support."""
    d = model_dir(path)
    cfg_file = d / "config.json"
    config = read_json_object(cfg_file)
    if "_class_name" not in config:
        raise ValueError(f"{cfg_file} has no _class_name (not a diffusers model config)")
    family = family_for_diffusers_class(config["_class_name"], source=str(cfg_file))
    cfg = family.config_from_diffusers(config, source=str(cfg_file))
    return family, cfg, config, d


def weight_files(d: Path) -> tuple[list[tuple[str, Path]], dict | None]:
    """The safetensors files of model dir ``d`` (name, path) and the index's ``weight_map``
    (None for one unsharded file); every file named by the index must lie inside ``d``."""
    if (d / WEIGHTS_INDEX_NAME).is_file():
        index = read_json_object(d / WEIGHTS_INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{d / WEIGHTS_INDEX_NAME} has no weight_map")
        names = sorted(set(weight_map.values()))
        files = [(n, contained(d, n, str(d / WEIGHTS_INDEX_NAME))) for n in names]
        return files, weight_map
    if (d / WEIGHTS_NAME).is_file():
        return [(WEIGHTS_NAME, d / WEIGHTS_NAME)], None
    found = sorted(p.name for p in d.iterdir())
    raise FileNotFoundError(
        f"{d} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (found {found}); "
        "only safetensors weights are read (no pickled .bin)"
    )


def header_shapes(
    d: Path, files: list[tuple[str, Path]], weight_map: dict | None
) -> dict[str, torch.Size]:
    """Every tensor's shape from the safetensors headers (no tensor data is read); the keys
    of each file must be those the index maps to it."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, torch.Size] = {}
    for name, f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} (listed in {WEIGHTS_INDEX_NAME}) is missing")
        try:
            with safe_open(str(f), framework="pt") as h:
                part = {k: torch.Size(h.get_slice(k).get_shape()) for k in h.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from e
        if weight_map is not None:
            stray = sorted(k for k in part if weight_map.get(k) != name)
            if stray:
                raise ValueError(f"{f} holds keys its index does not map to it: {stray[:8]}")
        shapes.update(part)
    if weight_map is not None and set(weight_map) - set(shapes):
        raise ValueError(
            f"{d}: keys of the index missing from the shards: "
            f"{sorted(set(weight_map) - set(shapes))[:8]}"
        )
    return shapes


def read_diffusers_dir(
    path: str | Path,
) -> tuple[ModelFamily, object, dict[str, torch.Tensor], dict]:
    """``(family, our config, diffusers state dict, config.json dict)`` of a diffusers model
    directory (or a pipeline root with ``transformer/``), validated as the module says
    before any tensor is loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    family, cfg, config, d = read_config(path)
    files, weight_map = weight_files(d)
    found = {
        k: torch.empty(s, device="meta") for k, s in header_shapes(d, files, weight_map).items()
    }
    expected = {k: torch.empty(s, device="meta") for k, s in family.diffusers_shapes(cfg).items()}
    check_keys_match(f"{d} (weights vs its config.json)", found, expected)
    sd: dict[str, torch.Tensor] = {}
    for _, f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from e
    return family, cfg, sd, config


def write_diffusers_dir(
    path: str | Path, sd: dict[str, torch.Tensor], config: dict, overwrite: bool = False
) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` into a new directory,
    atomically (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file

    config = dict(config)
    if "_diffusers_version" not in config:
        try:
            import diffusers

            config["_diffusers_version"] = diffusers.__version__
        except ImportError:  # pragma: no cover
            config["_diffusers_version"] = "0.42.1"
    with atomic_directory(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(path)
