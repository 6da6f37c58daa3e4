"""megatron-apt: Adversarial Post-Training of MMDiT flow-matching models into one-step
image and video generators, on megatron-core tensor/sequence parallelism and DeepSpeed ZeRO."""

__version__ = "0.1.0"
