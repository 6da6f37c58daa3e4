"""DeepSpeed side of training: configs per role, engines, EMA, checkpoints, the trainer.

The only package (with the entry point) that imports DeepSpeed."""
