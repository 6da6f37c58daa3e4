"""A small CNN trained on the synthetic shapes data; its penultimate layer is the feature
space of the Fréchet distance (no downloaded Inception weights).

Input: first and last frame stacked as 6 channels (images: the frame twice), so features see
colour, shape and motion. Trained to classify all three from samples rendered on the fly;
deterministic in its seed, cached as safetensors next to the evaluation outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_apt.data.synthetic import COLORS, MOTIONS, SHAPES, random_spec, render

MOTION_CLASSES = (*MOTIONS, "still")


def to_pair(frames_thwc: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[6, size, size]`` in [-1, 1] (first, last frame)."""
    x = torch.from_numpy(np.ascontiguousarray(frames_thwc[[0, -1]])).float() / 127.5 - 1.0
    x = x.permute(0, 3, 1, 2).reshape(6, *x.shape[1:3])
    if x.shape[-1] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return x


class FeatureNet(nn.Module):
    def __init__(self, size: int = 32, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(6, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feat_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict(
            {
                "color": nn.Linear(feat_dim, len(COLORS)),
                "shape": nn.Linear(feat_dim, len(SHAPES)),
                "motion": nn.Linear(feat_dim, len(MOTION_CLASSES)),
            }
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 6, size, size]`` -> ``[B, feat_dim]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def _training_batch(n: int, size: int, frames: int, rng: np.random.Generator):
    xs, labels = [], {"color": [], "shape": [], "motion": []}
    for _ in range(n):
        video = bool(rng.integers(2))
        spec = random_spec(int(rng.integers(1 << 30)), 0, size, video)
        pix = render(spec, size, frames if video else 1)
        x = to_pair(pix, size)
        xs.append(x + 0.05 * torch.randn(x.shape))  # a little noise: robustness to artefacts
        labels["color"].append(list(COLORS).index(spec.color))
        labels["shape"].append(SHAPES.index(spec.shape))
        labels["motion"].append(MOTION_CLASSES.index(spec.motion))
    return torch.stack(xs), {k: torch.tensor(v) for k, v in labels.items()}


def train_feature_net(size: int = 32, frames: int = 9, steps: int = 300, seed: int = 0):
    """Train on freshly rendered samples; returns the net and its held-out accuracies."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = FeatureNet(size)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        x, y = _training_batch(64, size, frames, rng)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _training_batch(256, size, frames, np.random.default_rng(seed + 1))
    with torch.no_grad():
        out = net(x)
    acc = {k: float((out[k].argmax(1) == y[k]).float().mean()) for k in out}
    return net.eval(), acc


def load_or_train_feature_net(
    cache: str | Path | None, size: int = 32, frames: int = 9, steps: int = 300, seed: int = 0
) -> tuple[FeatureNet, dict]:
    """The feature net for ``size``; loaded from ``cache`` (a .safetensors path) if present."""
    if cache is not None and Path(cache).exists():
        net = FeatureNet(size)
        net.load_state_dict(load_file(str(cache)))
        meta = Path(str(cache) + ".json")
        return net.eval(), json.loads(meta.read_text()) if meta.exists() else {}
    net, acc = train_feature_net(size, frames, steps, seed)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file(net.state_dict(), str(cache))
        Path(str(cache) + ".json").write_text(json.dumps(acc))
    return net, acc
