"""Quality on held-out data: token-weighted loss and perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalLoss:
    loss: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored (labels other than -100)
    examples: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def eval_loss(model, dataset, collate, *, batch_size: int, device) -> EvalLoss:
    """Mean next-token loss over every labelled token of ``dataset`` (already tokenized).

    The mean is over tokens, not over batches, so batch size and padding do not change it.

    Raises:
        ValueError: the data set has no labelled token.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shifted_labels = labels[:, 1:].reshape(-1)
            total_nll += F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum").item()
            total_tokens += int((shifted_labels != -100).sum())
    if was_training:
        model.train()
    if total_tokens == 0:
        raise ValueError("eval set has no labelled token to score")
    return EvalLoss(total_nll / total_tokens, total_tokens, len(dataset))
