"""Judging a trained model: held-out loss and perplexity, task accuracy, drift from the base model, and
records of several seeds combined."""
