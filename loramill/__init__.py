"""loramill: LoRA adapter fine-tuning, merging and multi-adapter serving."""

__version__ = "0.1.0"
