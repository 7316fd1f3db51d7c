"""Kinds of case, each a runner of the case protocol (:mod:`lorabench.kinds.protocol`): fine-tuning, classification,
inference (with GGUF), quantization error."""
