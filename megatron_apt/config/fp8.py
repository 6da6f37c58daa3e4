"""Shape constraints of Transformer Engine's FP8 GEMMs (family-neutral: every model's linears
and the training config's layout checks use them)."""

# Transformer Engine's FP8 GEMMs take an input or weight only when the product of all its
# dimensions but the last is divisible by 8 and the last by 16
# (transformer_engine/pytorch/utils.py, ``assert_dim_for_fp8_exec``, called on the local
# input of every TE linear before any sequence-parallel gather).
FP8_GEMM_ROWS, FP8_GEMM_COLS = 8, 16
