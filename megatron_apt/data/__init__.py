"""Training data: latent shard format, writer, data-parallel reader, preprocessing of captioned
media, and the synthetic coloured-shapes data set with its scorer.

Importing this package needs neither PyAV nor imageio: :mod:`megatron_apt.data.media` imports
them where a video is decoded or encoded (training, conversion and benchmarking never do).
"""

from megatron_apt.data.buckets import BUCKET_PRESETS, BucketPreset, get_preset
from megatron_apt.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardCorruptError,
    load_index,
    validate_index,
)
from megatron_apt.data.media import (
    MediaError,
    MediaItem,
    MediaLibraryMissing,
    list_inputs,
    read_frames,
    write_media,
)
from megatron_apt.data.preprocess import PreprocessConfig, preprocess
from megatron_apt.data.reader import LatentShardReader, check_compatible
from megatron_apt.data.synthetic import (
    estimate_attributes,
    make_synthetic_dataset,
    render,
    score_sample,
)
from megatron_apt.data.writer import build_index, write_index, write_shard

__all__ = [
    "BUCKET_PRESETS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BucketPreset",
    "LatentShardReader",
    "MediaError",
    "MediaItem",
    "MediaLibraryMissing",
    "PreprocessConfig",
    "ShardCorruptError",
    "build_index",
    "check_compatible",
    "estimate_attributes",
    "get_preset",
    "list_inputs",
    "load_index",
    "make_synthetic_dataset",
    "preprocess",
    "read_frames",
    "render",
    "score_sample",
    "validate_index",
    "write_index",
    "write_media",
    "write_shard",
]
