"""Training: one optimizer step at a time through the ``transformers.Trainer``, what a training case records,
and what the Trainer's integrations receive."""
