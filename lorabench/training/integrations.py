"""What the Trainer's integrations (``--report-to tensorboard`` or ``wandb``) receive beyond its own curves.

The Trainer streams each step's loss, learning rate and epoch. When a case ends, :func:`publish`
adds its benchmark figures (every measured metric of the result) and its hyper-parameters: in
TensorBoard as an HParams session in the case's log directory, so the HParams view of a run's
directory compares its configurations side by side; in W&B as the run's config and summary.
:func:`require` refuses a run whose integration package is missing, before any training.
"""

from __future__ import annotations

import importlib.util
import os
import time

from lorabench.errors import ConfigError
from lorabench.result import CaseResult

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

# The package each integration needs, and how to install it.
PACKAGES = {
    "tensorboard": ("tensorboard", "python -m pip install tensorboard"),
    "wandb": ("wandb", "python -m pip install 'lorabench[wandb]'"),
}
METRIC_TAG = "lorabench/"  # the benchmark figures' tags, apart from the Trainer's train/ curves
RUN_NAME_ENV = "LORABENCH_LOG_RUN"  # the controller's run name, inherited by pytest-xdist's workers


def run_name() -> str:
    """The name of this run's log directory (``reports/runs/<name>/<case>``): the start time and process.

    A pytest-xdist worker takes the name its controller set, so the cases of one run share a directory.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV]
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    os.environ[RUN_NAME_ENV] = name
    return name


def require(report_to: str) -> None:
    """Raise :class:`ConfigError` naming the install command when ``report_to``'s package is missing."""
    if report_to not in PACKAGES:
        return
    package, install = PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to}: the {package} package is not installed; install it with "
                          f"`{install}`, or drop --report-to")


def hyper_parameters(result: CaseResult) -> dict[str, str | int | float | bool]:
    """The case's model, data set and resolved configuration as scalars (lists joined), for HParams and W&B."""
    values: dict[str, str | int | float | bool] = {"model": result.model, "dataset": result.dataset}
    for key, value in result.config.items():
        if key == "tags" or value is None:
            continue
        values[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return values


def final_metrics(result: CaseResult) -> dict[str, float]:
    """Every figure the case measured, tagged ``lorabench/<metric>`` (a metric not measured is left out)."""
    return {METRIC_TAG + name: float(value) for name, value in sorted(result.metrics.items())}


def publish(report_to: str, log_dir: str | None, result: CaseResult, step: int) -> None:
    """Send the finished case's figures and hyper-parameters to ``report_to`` (``none``: nothing)."""
    if report_to == "tensorboard" and log_dir is not None:
        publish_tensorboard(log_dir, result, step)
    elif report_to == "wandb":
        publish_wandb(result)


def publish_tensorboard(log_dir: str, result: CaseResult, step: int) -> None:
    """An HParams session (hyper-parameters, final figures) and a scalar per figure at ``step``, in ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = final_metrics(result)
    # torch's add_hparams writes into a new sub-directory; written here, the session is the case's own directory
    experiment, start, end = hparams(hyper_parameters(result), metrics)
    with SummaryWriter(log_dir=log_dir) as writer:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)


def publish_wandb(result: CaseResult) -> None:
    """The case's hyper-parameters into the W&B run's config and its figures into the summary; then finish
    the run, so the next case in this process starts its own."""
    import wandb  # an optional extra: require() checked it at start-up

    if wandb.run is None:
        return
    wandb.run.config.update(hyper_parameters(result), allow_val_change=True)
    wandb.run.summary.update(final_metrics(result))
    wandb.finish()
