"""Harness overhead: the suite's training step against a bare PyTorch loop on the same work.

Both sides train the same configuration of the same model, from the same seed, on
batches of the same size from the same tokenized data. Their steps are interleaved
(suite, bare, suite, bare, ...) so that machine noise falls on both alike, and each
step is timed around the whole call, so the suite's side includes everything it does
per step: the Trainer's ``training_step``, gradient clipping, memory sampling,
progress logging and, for an isolated case, the round trip to the case process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from lorabench.config import BenchConfig
from lorabench.data.tasks import collator
from lorabench.models.loading import ModelSource, apply_adapter, load_model, load_tokenizer
from lorabench.training.loop import MAX_GRAD_NORM

# Deferred imports: torch, transformers inside the functions that use them: what only reads a configuration
# or a stored run starts without them.


class BareLoop:
    """forward, backward, clip, AdamW step: nothing else."""

    def __init__(self, source: ModelSource, config: BenchConfig, train_tokens, device) -> None:
        import torch
        from transformers import set_seed

        set_seed(config.seed)
        self.device = device
        self.model = apply_adapter(load_model(source, config, device).model, config)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(config.seed)
        self.loader = torch.utils.data.DataLoader(train_tokens, batch_size=config.batch_size, shuffle=True,
                                                  collate_fn=collator(load_tokenizer(source)), generator=generator)
        self._batches = self._endless()
        self.tokens: list[int] = []

    def _endless(self):
        while True:
            yield from self.loader

    def step(self) -> float:
        import torch

        batch = {k: v.to(self.device) for k, v in next(self._batches).items()}
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return value


@dataclass(frozen=True)
class OverheadReading:
    suite_step_ms: float  # medians over the measured steps
    bare_step_ms: float
    suite_tokens_per_s: float
    bare_tokens_per_s: float

    @property
    def ratio(self) -> float:
        """Suite tokens/s over bare tokens/s: 1.0 means no overhead."""
        return self.suite_tokens_per_s / self.bare_tokens_per_s

    @property
    def overhead_pct(self) -> float:
        return 100.0 * (1.0 - self.ratio)


def step_pair(suite_step, bare_step, suite_s: list[float], bare_s: list[float]) -> None:
    """One suite step, then one bare step, each timed on its own; their times go to ``suite_s`` and ``bare_s``.

    Alternating the two keeps both sides under the same machine state (load, caches, clocks).
    """
    for fn, times in ((suite_step, suite_s), (bare_step, bare_s)):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)


def compare(suite_s: list[float], bare_s: list[float], suite_tokens: list[int], bare_tokens: list[int],
            warmup: int) -> OverheadReading:
    """Post-warm-up medians and tokens/s of both sides, each from its own tokens."""
    return OverheadReading(
        suite_step_ms=statistics.median(suite_s[warmup:]) * 1000,
        bare_step_ms=statistics.median(bare_s[warmup:]) * 1000,
        suite_tokens_per_s=sum(suite_tokens[warmup:]) / sum(suite_s[warmup:]),
        bare_tokens_per_s=sum(bare_tokens[warmup:]) / sum(bare_s[warmup:]),
    )


def round_trip_s(run, rounds: int = 200) -> float:
    """Median cost of one message round trip to an isolated case process, in seconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run.ping()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
