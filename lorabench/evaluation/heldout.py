"""Quality on held-out data: token-weighted loss, perplexity, and teacher-forced exact match."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.


@dataclass(frozen=True)
class EvalLoss:
    loss: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored (labels other than -100)
    examples: int
    exact: int = 0  # answered rows whose every labelled token is the model's argmax (see eval_loss)
    answered: int = 0  # rows whose labels end in EOS: the whole answer survived truncation

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def eval_loss(model, dataset, collate, *, batch_size: int, device, eos_token_id: int | None = None) -> EvalLoss:
    """Mean next-token loss over every labelled token of ``dataset`` (already tokenized).

    The mean is over tokens, not over batches, so batch size and padding do not change it.

    With ``eos_token_id``, the same forward pass also counts exact matches: a row whose labels
    end in EOS is correct when the argmax at every labelled position is the label. By induction
    over the answer's tokens, that holds exactly when greedy decoding from the prompt emits the
    answer's tokens and then EOS, so it is greedy-generation exact match at no extra cost.

    Raises:
        ValueError: the data set has no labelled token.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = exact = answered = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            shifted_labels = labels[:, 1:]
            flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            total_nll += F.cross_entropy(flat_logits, shifted_labels.reshape(-1), ignore_index=-100, reduction="sum").item()
            scored = shifted_labels != -100
            total_tokens += int(scored.sum())
            if eos_token_id is not None:
                hits = (logits[:, :-1].argmax(-1) == shifted_labels) | ~scored
                complete = torch.tensor([r["labels"][-1] == eos_token_id for r in rows], device=labels.device)
                answered += int(complete.sum())
                exact += int((hits.all(dim=1) & complete).sum())
    if was_training:
        model.train()
    if total_tokens == 0:
        raise ValueError("eval set has no labelled token to score")
    return EvalLoss(total_nll / total_tokens, total_tokens, len(dataset), exact, answered)
