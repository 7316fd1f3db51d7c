"""lorabench's pytest plugin, loaded wherever lorabench is installed (``pytest11`` entry point ``lorabench``).

It brings the command-line options (``--model``, ``--dataset``, ``--steps``, ``--thresholds``,
``--isolate``, ...), the bench markers, the fine-tuning matrix as the parameter ``bench_case``,
the gates of ``thresholds.yaml`` (checked with every input before any case trains), and these fixtures:

- ``bench_session``: the run's matrix, device, gates and results so far;
- ``model_source``, ``tokenizer_for``, ``task_data``, ``task_tokens``, ``case_data``: session caches of models
  and data;
- ``finetune_result``: runs ``bench_case`` through its launcher (:mod:`lorabench.run.launch`: in its own
  process unless ``--isolate none``) under pytest-benchmark, gates it and records it; a test asserts on
  it with :func:`assert_case_passed`;
- ``inference_adapter``, ``measure_inference``, ``gguf_export`` and their caches: inference cases.

Helpers for a test body: :func:`record_result` (gate and keep a result a test built itself),
:func:`assert_case_passed`, :func:`report_case` (Allure) and :func:`step_timer` (the timing
protocol: one pytest-benchmark round per optimizer step after warm-up). Disable the plugin with
``-p no:lorabench``.
"""

import importlib

# registered with this module, hooks first (it quiets the Hugging Face libraries before any of them is
# imported): then pytest-xdist and --shard, then the fixtures
pytest_plugins = [
    "lorabench.pytest_plugin.hooks",
    "lorabench.pytest_plugin.scaleout",
    "lorabench.pytest_plugin.models",
    "lorabench.pytest_plugin.data",
    "lorabench.pytest_plugin.case",
    "lorabench.pytest_plugin.inference",
]

# the public names, imported when first asked for: importing the modules here, before pytest registers
# them, would keep pytest from rewriting their asserts
_PUBLIC = {"SESSION_KEY": "hooks", "assert_case_passed": "case", "record_result": "case", "report_case": "case",
           "step_timer": "case"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
