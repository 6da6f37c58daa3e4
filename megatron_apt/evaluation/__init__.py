"""Sample quality on the synthetic shapes data: Fréchet distance in the feature space of a
small network trained on that data, sharpness, and caption accuracy."""

from megatron_apt.evaluation.features import FeatureNet, load_or_train_feature_net
from megatron_apt.evaluation.metrics import (
    caption_accuracy,
    evaluate_samples,
    frechet_distance,
    sharpness,
)

__all__ = [
    "FeatureNet",
    "caption_accuracy",
    "evaluate_samples",
    "frechet_distance",
    "load_or_train_feature_net",
    "sharpness",
]
