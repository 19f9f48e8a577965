"""The training core: checkpoints, base models, datasets, LoRA training, the PEFT adapter format.

Submodules import torch/transformers only where they need them, so `adapters.checkpoint`
and `adapters.errors` stay light for the CLI.
"""
