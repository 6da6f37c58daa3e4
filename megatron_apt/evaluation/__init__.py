"""Sample quality on the synthetic shapes data: Fréchet distance (with a bootstrap interval) in
the feature space of a small network trained on that data, sharpness relative to real data,
background noise, colour-saturation distance and caption accuracy."""

from megatron_apt.evaluation.features import FeatureNet, load_or_train_feature_net
from megatron_apt.evaluation.metrics import (
    FrechetBootstrap,
    Reference,
    background_noise,
    background_noise_values,
    caption_accuracy,
    evaluate_against_real,
    evaluate_samples,
    frechet_distance,
    frechet_distance_bootstrap,
    saturation_distance,
    saturation_values,
    sharpness,
)

__all__ = [
    "FeatureNet",
    "FrechetBootstrap",
    "Reference",
    "background_noise",
    "background_noise_values",
    "caption_accuracy",
    "evaluate_against_real",
    "evaluate_samples",
    "frechet_distance",
    "frechet_distance_bootstrap",
    "load_or_train_feature_net",
    "saturation_distance",
    "saturation_values",
    "sharpness",
]
