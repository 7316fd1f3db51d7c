"""lorabench: a pytest benchmark suite for LoRA and QLoRA fine-tuning."""

__version__ = "0.1.0"
