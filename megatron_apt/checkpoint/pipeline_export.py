"""A post-trained SD3-style generator -> a runnable diffusers ``StableDiffusion3Pipeline``
directory: our transformer (converted), the base pipeline's text encoders, tokenizers and VAE
(symlinked, or copied with ``copy=True``) and a scheduler that makes diffusers take OUR step.

Why the scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1.0)``:

* one step: diffusers' sigmas for ``num_inference_steps=1`` are ``[sigma_max, 0] = [1, 0]``
  under ANY static shift (``shift(1) = 1``), so the pipeline computes
  ``x = z + (0 - 1) v(z, 1000) = z - v(z, 1)``: the APT generator ``G(z, c)``;
* two steps: the zero-shot two-step sampler (``tools/generate.py --steps 2 --t-mid m``) is
  ``x_m = (1 - m) G(z) + m z = z - (1 - m) v(z, 1)``, then ``x_m - m v(x_m, m)``: Euler steps
  over the sigmas ``[1, m, 0]``. diffusers applies the scheduler's shift to sigmas passed to
  the pipeline (``set_timesteps(sigmas=...)`` shifts them), so with ``shift=1.0``
  ``pipe(prompt, sigmas=[1.0, m], guidance_scale=1.0)`` is exactly our two-step sample.
  (The default ``num_inference_steps=2`` would give ``[1, 0.001, 0]``: pass ``sigmas``.)

``guidance_scale=1.0``: the generator was distilled with guidance, it samples without CFG.

A Wan generator (``WanTransformer3DModel``) goes into a ``WanPipeline`` directory around the
base's umT5, tokenizer and VAE. ``WanPipeline.__call__`` takes no ``sigmas``
(``pipeline_wan.py:554``: ``set_timesteps(num_inference_steps)``), so the two-step schedule is
put into the scheduler's shift instead: ``FlowMatchEulerDiscreteScheduler.set_timesteps(2)``
gives the sigmas ``[1, S(1 / N), 0]`` where ``S`` is the shift applied twice (once in
``__init__``, once in ``set_timesteps``), i.e. the shift ``s^2``;
``s = sqrt(m (N - 1) / (1 - m))`` makes that middle sigma ``m`` (to float32 rounding), and one
step stays ``[1, 0]`` under any shift. So ``pipe(prompt, num_inference_steps=1,
guidance_scale=1.0)`` is our one step and ``num_inference_steps=2`` our zero-shot two steps
through ``t_mid = m``; other step counts of that scheduler are not meaningful.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from megatron_apt.checkpoint import diffusers_sd3 as sd3
from megatron_apt.checkpoint.diffusers_dir import write_diffusers_dir
from megatron_apt.models.families import family_of
from megatron_apt.models.wan.diffusers_mapping import WAN_CLASS
from megatron_apt.text.sd3 import is_sd3_pipeline_dir
from megatron_apt.text.wan import is_wan_pipeline_dir
from megatron_apt.utils.paths import atomic_directory, read_json_object

__all__ = [
    "EXPORT_README",
    "SCHEDULER_CONFIG",
    "export_diffusers_pipeline",
    "wan_scheduler_config",
]

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
"""The exported pipeline's scheduler (module docstring: why shift 1)."""

_OURS = ("transformer", "transformer_2", "scheduler")  # transformer_2: Wan2.2's second expert
EXPORT_README = "README.md"


def wan_scheduler_config(t_mid: float = 0.5, num_train_timesteps: int = 1000) -> dict:
    """The exported Wan pipeline's scheduler: ``FlowMatchEulerDiscreteScheduler`` whose one
    step is ``[1, 0]`` and whose two steps are ``[1, t_mid, 0]`` (module docstring)."""
    if not 0.0 < t_mid < 1.0:
        raise ValueError(f"t_mid={t_mid} must lie in (0, 1)")
    n = num_train_timesteps
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": n,
        "shift": math.sqrt(t_mid * (n - 1) / (1 - t_mid)),
        "use_dynamic_shifting": False,
    }


def _components(index: dict) -> list[str]:
    """The base's component folders we take over (all but the transformer and scheduler;
    entries like ``"image_encoder": [null, null]`` are absent components)."""
    return sorted(
        k
        for k, v in index.items()
        if not k.startswith("_") and k not in _OURS and isinstance(v, list) and any(v)
    )


def _check_sd3_base(base: Path, cfg) -> dict:
    """The base pipeline's ``model_index.json`` after checking that its components fit the
    transformer of ``cfg`` (text width, pooled width, latent channels)."""
    if not base.is_dir() or not is_sd3_pipeline_dir(base):
        raise ValueError(
            f"--base {base} is not an SD3/SD3.5 pipeline directory (model_index.json of "
            "StableDiffusion3Pipeline with text_encoder/, text_encoder_2/, vae/ ...)"
        )
    index = read_json_object(base / "model_index.json")
    for name in _components(index):
        if not (base / name).is_dir():
            raise FileNotFoundError(
                f"{base / 'model_index.json'} lists {name!r} but {base / name} is missing"
            )
    errors = []
    vae = read_json_object(base / "vae" / "config.json")
    if vae.get("latent_channels") != cfg.in_channels:
        errors.append(
            f"{base / 'vae/config.json'}: latent_channels {vae.get('latent_channels')} but the "
            f"transformer has in_channels {cfg.in_channels}"
        )
    pooled = sum(
        read_json_object(base / enc / "config.json").get("projection_dim", 0)
        for enc in ("text_encoder", "text_encoder_2")
    )
    if pooled != cfg.pooled_text_dim:
        errors.append(
            f"{base}: the CLIP encoders' pooled width is {pooled} but the transformer takes "
            f"pooled_text_dim {cfg.pooled_text_dim}"
        )
    if (base / "text_encoder_3").is_dir():
        width = read_json_object(base / "text_encoder_3" / "config.json").get("d_model")
        if width != cfg.text_dim:
            errors.append(
                f"{base / 'text_encoder_3/config.json'}: d_model {width} but the transformer "
                f"takes text_dim {cfg.text_dim}"
            )
    if errors:
        raise ValueError(
            "the checkpoint does not belong to this base pipeline: " + "; ".join(errors)
        )
    return index


def _check_wan_base(base: Path, cfg) -> dict:
    """The base Wan pipeline's ``model_index.json`` after checking that its umT5 and VAE fit
    the transformer of ``cfg`` (text width, latent channels)."""
    index_file = base / "model_index.json"
    if not (base.is_dir() and index_file.is_file() and is_wan_pipeline_dir(base)):
        raise ValueError(
            f"--base {base} is not a Wan pipeline directory (model_index.json of WanPipeline "
            "with text_encoder/, tokenizer/, vae/)"
        )
    index = read_json_object(index_file)
    if index.get("_class_name") != "WanPipeline":
        raise ValueError(
            f"{index_file}: _class_name {index.get('_class_name')!r}; the export writes a "
            "text-to-video WanPipeline"
        )
    if index.get("expand_timesteps"):
        raise ValueError(
            f"{index_file}: expand_timesteps={index['expand_timesteps']!r} (Wan2.2 TI2V's "
            "per-token timesteps) is not implemented for our Wan model"
        )
    for name in ("text_encoder", "tokenizer", "vae", *_components(index)):
        if not (base / name).is_dir():
            raise FileNotFoundError(f"{index_file} lists {name!r} but {base / name} is missing")
    errors = []
    vae = read_json_object(base / "vae" / "config.json")
    if vae.get("z_dim") != cfg.in_channels:
        errors.append(
            f"{base / 'vae/config.json'}: z_dim {vae.get('z_dim')} but the transformer has "
            f"in_channels {cfg.in_channels}"
        )
    width = read_json_object(base / "text_encoder" / "config.json").get("d_model")
    if width != cfg.text_dim:
        errors.append(
            f"{base / 'text_encoder/config.json'}: d_model {width} but the transformer takes "
            f"text_dim {cfg.text_dim}"
        )
    if errors:
        raise ValueError(
            "the checkpoint does not belong to this base pipeline: " + "; ".join(errors)
        )
    return index


def export_diffusers_pipeline(
    src,
    base,
    dst,
    overwrite: bool = False,
    copy: bool = False,
    ema: bool = False,
    t_mid: float = 0.5,
) -> Path:
    """Write a ``StableDiffusion3Pipeline`` (SD3-style MMDiT) or ``WanPipeline`` (Wan)
    directory ``dst`` around the generator in ``src`` (any checkpoint
    :func:`megatron_apt.checkpoint.convert.read_checkpoint` reads: a model file, a TP-sharded
    directory, a training checkpoint's generator) with the text encoders, tokenizers and VAE
    of the pipeline directory ``base`` (of the same family). ``copy``: copy those folders
    instead of symlinking them (a self-contained directory to ship). Atomic: ``dst`` appears
    only complete. ``ema``: a training checkpoint's EMA generator. ``t_mid``: the README's
    two-step example (SD3); Wan: the middle sigma of the scheduler's two steps."""
    from megatron_apt.checkpoint.convert import check_output, read_checkpoint

    base, dst = Path(base).resolve(), Path(dst)
    check_output(dst, 1, overwrite)
    state, cfg, meta = read_checkpoint(src, None, ema)
    if meta["role"] == "discriminator":
        raise ValueError(f"{src} holds a discriminator; export the generator")
    family = family_of(cfg)
    if family.diffusers_class not in (sd3.SD3_CLASS, WAN_CLASS):
        raise ValueError(
            f"{src} holds a {family.name!r} model; the pipeline export writes a "
            "StableDiffusion3Pipeline (SD3-style MMDiTs) or a WanPipeline (Wan)"
        )
    if family.diffusers_class == sd3.SD3_CLASS:
        config = sd3.mmdit_to_sd3_config(cfg)  # refuses rope3d and other non-SD3 configs
        index = _check_sd3_base(base, cfg)
        weights = sd3.mmdit_to_sd3(state, cfg)
        scheduler, readme = SCHEDULER_CONFIG, _readme(src, base, copy, t_mid)
    else:
        config = family.config_to_diffusers(cfg)
        index = _check_wan_base(base, cfg)
        weights = family.to_diffusers(state, cfg)
        scheduler, readme = wan_scheduler_config(t_mid), _wan_readme(src, base, copy, t_mid)
    with atomic_directory(dst, overwrite) as tmp:
        for name in _components(index):
            if copy:
                shutil.copytree(base / name, tmp / name, symlinks=False)
            else:
                os.symlink(base / name, tmp / name, target_is_directory=True)
        write_diffusers_dir(tmp / "transformer", weights, config)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2) + "\n"
        )
        index = {**index, "transformer": ["diffusers", family.diffusers_class]}
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        if "transformer_2" in index:  # one transformer: ours
            index["transformer_2"] = [None, None]
            index["boundary_ratio"] = None
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / EXPORT_README).write_text(readme)
    return dst


def _readme(src, base: Path, copy: bool, t_mid: float) -> str:
    how = "copied from" if copy else "symlinked to"
    return f"""# One-step generator (Adversarial Post-Training, megatron-apt)

Transformer exported from `{src}`; text encoders, tokenizers and VAE {how} `{base}`.
The scheduler is `FlowMatchEulerDiscreteScheduler(shift=1.0)`: one Euler step from sigma 1 to 0
is exactly the generator `G(z, c) = z - v(z, c, 1)`.

```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{"<this directory>"}", torch_dtype=torch.bfloat16)
image = pipe("a corgi surfing", num_inference_steps=1, guidance_scale=1.0).images[0]
# zero-shot two steps (megatron-apt --steps 2 --t-mid {t_mid:g}):
image = pipe("a corgi surfing", sigmas=[1.0, {t_mid:g}], guidance_scale=1.0).images[0]
```

Sample without classifier-free guidance (`guidance_scale=1.0`): the guidance was distilled in.
"""


def _wan_readme(src, base: Path, copy: bool, t_mid: float) -> str:
    how = "copied from" if copy else "symlinked to"
    shift = wan_scheduler_config(t_mid)["shift"]
    return f"""# One-step Wan generator (Adversarial Post-Training, megatron-apt)

Transformer exported from `{src}`; umT5 text encoder, tokenizer and VAE {how} `{base}`.
The scheduler is `FlowMatchEulerDiscreteScheduler(shift={shift:.6g})`: one Euler step from
sigma 1 to 0 is exactly the generator `G(z, c) = z - v(z, c, 1)` (the pretrained Wan's unmasked
text), and two steps go through the sigmas `[1, {t_mid:g}, 0]`: megatron-apt's zero-shot
two-step sampler (`--steps 2 --t-mid {t_mid:g}`). Other step counts are not meaningful.

```python
import torch
from diffusers import WanPipeline

pipe = WanPipeline.from_pretrained("{"<this directory>"}", torch_dtype=torch.bfloat16)
video = pipe("a corgi surfing", num_inference_steps=1, guidance_scale=1.0).frames[0]
video = pipe("a corgi surfing", num_inference_steps=2, guidance_scale=1.0).frames[0]  # two steps
```

Sample without classifier-free guidance (`guidance_scale=1.0`): the guidance was distilled in.
Loading needs `accelerate` (diffusers keeps `WanTransformer3DModel._keep_in_fp32_modules` in
fp32 only through it).
"""
