"""Harness overhead: the suite's lora step against a bare PyTorch loop, in one process.

Target: the suite costs at most 5% of tokens/s, isolation's round trip included.
"""

from dataclasses import replace

import pytest

from lorabench.case_kinds import DEFAULT_KIND
from lorabench.run.launch import InlineLauncher, ProcessLauncher, resolve_case
from lorabench.matrix import DEFAULT_CONFIGS
from lorabench.proofs.overhead import BareLoop, compare, round_trip_s, step_pair

MAX_OVERHEAD_PCT = 5.0


@pytest.mark.overhead
def test_harness_overhead(benchmark, bench_session, model_source, case_data):
    model, dataset = bench_session.matrix.models[0], bench_session.matrix.datasets[0]
    source = model_source(model)
    lora = next((c for c in bench_session.matrix.configs if c.id == "lora"),
                next(c for c in DEFAULT_CONFIGS if c.id == "lora"))
    device = bench_session.device
    case = resolve_case(DEFAULT_KIND, case_id="overhead", model=model, dataset=dataset, device=device, config=lora,
                        source=source)
    config, tokens = case.config, case_data(case)

    run = InlineLauncher().start(case, case_data)
    run.prepare()
    bare = BareLoop(source, config, tokens.train, device)
    suite_s, bare_s = [], []

    def pair():
        run.control()  # the suite's untimed control workload (lorabench.meters.control), as in every case
        step_pair(run.step, bare.step, suite_s, bare_s)

    benchmark.group = "overhead"
    for _ in range(config.warmup_steps):
        pair()
    benchmark.pedantic(pair, rounds=config.steps - config.warmup_steps, iterations=1)
    reading = compare(suite_s, bare_s, run.step_runner.record.tokens, bare.tokens, config.warmup_steps)
    run.close()

    isolated = ProcessLauncher().start(replace(case, case_id="overhead-isolated"), case_data)
    isolated.prepare()
    trip_s = round_trip_s(isolated)
    isolated.close()
    trip_pct = 100.0 * trip_s * 1000 / reading.bare_step_ms
    total_pct = reading.overhead_pct + trip_pct

    benchmark.extra_info.update({
        "overhead": {
            "config": lora.id, "model": model, "dataset": dataset, "device": str(device),
            "suite_step_ms": reading.suite_step_ms, "bare_step_ms": reading.bare_step_ms,
            "suite_tokens_per_s": reading.suite_tokens_per_s, "bare_tokens_per_s": reading.bare_tokens_per_s,
            "tokens_per_s_ratio": reading.ratio, "in_process_overhead_pct": reading.overhead_pct,
            "isolation_round_trip_ms": trip_s * 1000, "isolation_overhead_pct": trip_pct,
            "total_overhead_pct": total_pct,
        }
    })
    print(f"\nsuite {reading.suite_tokens_per_s:.0f} tokens/s, bare {reading.bare_tokens_per_s:.0f} tokens/s, "
          f"ratio {reading.ratio:.4f}; isolation round trip {trip_s * 1e6:.0f} us ({trip_pct:.3f}% of a bare step)")
    assert total_pct <= MAX_OVERHEAD_PCT, (
        f"harness overhead {total_pct:.2f}% exceeds {MAX_OVERHEAD_PCT}% "
        f"(suite {reading.suite_tokens_per_s:.0f} vs bare {reading.bare_tokens_per_s:.0f} tokens/s, "
        f"round trip {trip_s * 1000:.3f} ms)"
    )
