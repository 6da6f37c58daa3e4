"""Family-neutral configuration: the training config (:mod:`.training`), the recipes
(:mod:`.recipes`), the FLOPs of the training phases (:mod:`.flops`), the memory planner
(:mod:`.memory`) and Transformer Engine's FP8 shape rules (:mod:`.fp8`). A model family's
config and presets live with the family (``megatron_apt.models.mmdit.config``,
``megatron_apt.models.wan.config``); config/ imports models/ only lazily, inside functions.
"""
