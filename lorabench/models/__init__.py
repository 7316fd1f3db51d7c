"""Models: resolving a ``--model``, loading it (quantized by its backend), the embedded zoo and real model, adapters."""
