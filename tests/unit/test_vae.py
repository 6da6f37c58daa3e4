"""VAE wrappers: identity round trip, tiny diffusers image/video VAEs (shapes, normalization
exactly as the config says, loading), and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_apt.vae import (
    DiffusersImageVAE,
    IdentityVAE,
    WanVideoVAE,
    build_tiny_vae,
    init_tiny_vae,
    load_vae,
)


def _pixels(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1  # [B, 3, T, H, W] in [-1, 1]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {kind: build_tiny_vae(root / kind, kind=kind, seed=1) for kind in ("image", "video")}


# ---------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, patch", [("identity", 1), ("identity:2", 2)])
def test_identity_round_trip_is_exact(spec, patch):
    vae = load_vae(spec)
    assert isinstance(vae, IdentityVAE) and vae.latent_channels == 3 * patch**2
    x = _pixels(2, 3, 8, 12)
    z = vae.encode(x)
    assert (
        tuple(z.shape[1:])
        == vae.latent_shape(3, 8, 12)
        == (3 * patch**2, 3, 8 // patch, 12 // patch)
    )
    assert torch.equal(vae.decode(z), x)
    assert vae.pixel_shape(*z.shape[2:]) == (3, 3, 8, 12)
    if patch == 2:  # pixel_unshuffle channel order: c * 4 + i * 2 + j
        assert torch.equal(z[:, 1 * 4 + 1 * 2 + 0], x[:, 1, :, 1::2, 0::2])


def test_identity_normalization_like_a_real_vae():
    """``identity:<p>:<shift>:<scale>``: latents = (pixels - shift) * scale, decoded back to the
    pixels (float round-off); the demo's constants give its clips about zero mean, unit std."""
    from megatron_apt.data.synthetic import random_spec, render

    vae = load_vae("identity:2:-0.72:3.0")
    assert (vae.shift, vae.scale) == (-0.72, 3.0)
    x = _pixels(2, 3, 8, 12)
    z = vae.encode(x)
    torch.testing.assert_close(z, (load_vae("identity:2").encode(x) + 0.72) * 3.0)
    torch.testing.assert_close(vae.decode(z), x, atol=1e-6, rtol=0)
    clips = np.stack([render(random_spec(0, i, 16, True), 16, 5) for i in range(256)])
    pix = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, T, H, W]
    lat = vae.encode(pix)
    assert abs(lat.mean().item()) < 0.1 and abs(lat.std().item() - 1) < 0.1


def test_identity_errors():
    with pytest.raises(ValueError, match="divisible by 2.*7x8"):
        load_vae("identity:2").encode(_pixels(1, 1, 7, 8))
    with pytest.raises(ValueError, match="identity:x"):
        load_vae("identity:x")
    for bad in ("identity:2:0.5", "identity:2:a:1", "identity:2:0:0", "identity:2:0:-1"):
        with pytest.raises(ValueError, match="shift|scale"):
            load_vae(bad)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\].*\(1, 3, 8, 8\)"):
        load_vae("identity").encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, T', H', W'\]"):
        load_vae("identity").decode(torch.zeros(1, 4, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# tiny diffusers VAEs
# ---------------------------------------------------------------------------------------------


def test_image_vae_shapes_and_normalization(tiny_dirs):
    vae = load_vae(f"tiny:{tiny_dirs['image']}")
    assert isinstance(vae, DiffusersImageVAE)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 1, 2)
    x = _pixels(2, 3, 16, 24)
    z = vae.encode(x)
    assert z.dtype == torch.float32 and z.is_contiguous()
    assert tuple(z.shape) == (2, *vae.latent_shape(3, 16, 24))
    assert tuple(z.shape) == (2, 4, 3, 8, 12)

    raw = init_tiny_vae("image", seed=1)
    cfg = json.loads((tiny_dirs["image"] / "config.json").read_text())
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (1.5305, 0.0609)
    with torch.no_grad():
        for t in range(3):  # frame by frame, SD3's formula
            mode = raw.encode(x[:, :, t]).latent_dist.mode()
            assert torch.equal(z[:, :, t], (mode - cfg["shift_factor"]) * cfg["scaling_factor"])
        ref = raw.decode(z[:, :, 1] / cfg["scaling_factor"] + cfg["shift_factor"]).sample
    y = vae.decode(z)
    assert tuple(y.shape) == tuple(x.shape) and y.abs().max() <= 1
    torch.testing.assert_close(y[:, :, 1], ref.clamp(-1, 1), atol=1e-6, rtol=0)


def test_video_vae_shapes_and_normalization(tiny_dirs):
    vae = load_vae(str(tiny_dirs["video"]))
    assert isinstance(vae, WanVideoVAE) and vae.causal
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 4, 4)
    x = _pixels(2, 5, 16, 16)
    z = vae.encode(x)
    assert tuple(z.shape) == (2, *vae.latent_shape(5, 16, 16)) == (2, 4, 2, 4, 4)
    assert vae.latent_shape(1, 16, 16) == (4, 1, 4, 4)

    raw = init_tiny_vae("video", seed=1)
    cfg = json.loads((tiny_dirs["video"] / "config.json").read_text())
    mean = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        mode = raw.encode(x).latent_dist.mode()
    assert torch.equal(z, (mode - mean) * (1.0 / std))  # the Wan pipelines' order, bitwise

    y = vae.decode(z)
    assert tuple(y.shape) == tuple(x.shape) and y.abs().max() <= 1
    assert vae.pixel_shape(2, 4, 4) == (3, 5, 16, 16)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_loaded_equals_in_memory_model(tiny_dirs, kind):
    loaded = load_vae(str(tiny_dirs[kind]))
    wrapper = DiffusersImageVAE if kind == "image" else WanVideoVAE
    in_memory = wrapper(init_tiny_vae(kind, seed=1))
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = _pixels(1, 5, 16, 16, seed=2)
    z = loaded.encode(x)
    assert torch.equal(z, in_memory.encode(x))
    assert torch.equal(loaded.decode(z), in_memory.decode(z))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_posterior_sample_is_seeded(tiny_dirs, kind):
    vae = load_vae(str(tiny_dirs[kind]))
    x = _pixels(1, 1, 16, 16)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, vae.encode(x))
    assert torch.equal(vae.encode(x), vae.encode(x))  # mode: deterministic


def test_bad_sizes_are_named(tiny_dirs):
    video = load_vae(str(tiny_dirs["video"]))
    with pytest.raises(ValueError, match=r"1 \+ 4 k.*got 6"):
        video.latent_shape(6, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4.*18x16"):
        video.encode(_pixels(1, 5, 18, 16))
    image = load_vae(str(tiny_dirs["image"]))
    with pytest.raises(ValueError, match="divisible by 2.*16x15"):
        image.latent_shape(1, 16, 15)
    with pytest.raises(ValueError, match=r"\[B, 4, T', H', W'\].*\(1, 3, 1, 8, 8\)"):
        image.decode(torch.zeros(1, 3, 1, 8, 8))


def test_unknown_class_and_missing_dir_are_named(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        load_vae(str(tmp_path / "no-such-vae"))
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny_dirs["image"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(ValueError, match="'AutoencoderTiny'") as err:
        load_vae(str(bad))
    assert str(bad) in str(err.value)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(str(bad))  # no weights
    with pytest.raises(ValueError, match="'sound'"):
        build_tiny_vae(tmp_path / "x", kind="sound")


def test_model_directory_with_vae_subfolder(tiny_dirs, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "vae").symlink_to(tiny_dirs["image"], target_is_directory=True)
    vae = load_vae(str(tmp_path / "model"))
    x = _pixels(1, 1, 16, 16)
    assert torch.equal(vae.encode(x), load_vae(str(tiny_dirs["image"])).encode(x))
