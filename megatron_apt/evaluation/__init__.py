"""Sample quality on the synthetic shapes data: Fréchet distances (with bootstrap intervals) in
the feature space of a small video network trained on that data, over the whole clip and per
caption class, sharpness relative to real data, background noise, colour-saturation distance
and caption accuracy (with intervals)."""

from megatron_apt.evaluation.features import VideoFeatureNet, load_or_train_feature_net
from megatron_apt.evaluation.metrics import (
    FrechetBootstrap,
    Reference,
    background_noise,
    background_noise_values,
    caption_accuracy,
    conditional_frechet_bootstrap,
    evaluate_against_real,
    evaluate_samples,
    frechet_distance,
    frechet_distance_bootstrap,
    saturation_distance,
    saturation_values,
    sharpness,
)

__all__ = [
    "FrechetBootstrap",
    "VideoFeatureNet",
    "Reference",
    "background_noise",
    "background_noise_values",
    "caption_accuracy",
    "conditional_frechet_bootstrap",
    "evaluate_against_real",
    "evaluate_samples",
    "frechet_distance",
    "frechet_distance_bootstrap",
    "load_or_train_feature_net",
    "saturation_distance",
    "saturation_values",
    "sharpness",
]
