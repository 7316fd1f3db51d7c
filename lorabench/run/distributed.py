"""Multi-process cases: ``world_size`` ranks launched by ``torchrun``, DistributedDataParallel or FSDP2.

A case with ``world_size > 1`` runs as ``python -m torch.distributed.run --standalone
--nproc-per-node W -m lorabench.run.distributed PAYLOAD`` (:class:`TorchrunRanks`, started by
:class:`lorabench.run.launch.TorchrunLauncher`; the payload is the resolved case, data included).
Every rank builds the same runner (:class:`lorabench.kinds.finetune.CaseRun`) with a :class:`RankParallel`,
which wraps the model for its strategy (DDP: a whole replica per rank, gradients all-reduced;
FSDP2 ``fully_shard``: each rank holds 1/W of every parameter, gathered for compute) and feeds
the rank its own share of the data (the Trainer's data loader shards by rank). The backend is
NCCL on CUDA (one GPU per rank) and gloo on the CPU (the ranks share the launching process's threads).

Rank 0 connects back to the pytest process and obeys the same commands as an isolated case
(``step``, ``control``, ``finish``: :func:`lorabench.kinds.protocol.serve` with a :class:`RankGroup`),
broadcasting each to the other ranks, so pytest-benchmark times every optimizer step of all
ranks together (a barrier ends each step). At ``finish`` every rank's result record is gathered
and :func:`combine_ranks` makes the case's record: per-device memory is the largest rank's,
throughput is the sum over ranks, and the per-rank figures go into ``details["ranks"]``.
:func:`record_scaling` then sets the scaling efficiency against the single-device case of the
same configuration.
"""

from __future__ import annotations

from multiprocessing.connection import Client
from multiprocessing.connection import Listener
import copy
import logging
import os
import pickle
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from lorabench.run.isolation import ChildFailed, send_logs
from lorabench.kinds.protocol import ResolvedCase, build_runner, serve
from lorabench.run.quiet import QUIET_ENV
from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_ERROR, STATUS_OK, CaseResult
from lorabench.training.recording import record_train_loss

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

ENV_ADDRESS = "LORABENCH_PARENT_ADDRESS"
ENV_AUTHKEY = "LORABENCH_PARENT_AUTHKEY"
CONNECT_TIMEOUT_S = 600.0  # torchrun starts W interpreters that import torch and the HF stack
# Figures of the device a rank runs on: the case's value is the largest rank's.
PER_DEVICE = ("rss_before_mib", "peak_rss_mib", "peak_rss_delta_mib", "avg_rss_delta_mib", "peak_alloc_mib",
              "peak_reserved_mib", "alloc_before_mib", "avg_alloc_mib", "device_used_max_mib", "weights_mib",
              "trainable_mib", "grads_mib", "optimizer_state_mib", "other_mib")
SUMMED = ("tokens_per_s", "samples_per_s")  # every rank trains on its own data: throughput adds up
RANK_FIGURES = ("peak_rss_delta_mib", "peak_alloc_mib", "weights_mib", "grads_mib", "optimizer_state_mib",
                "tokens_per_s", "step_ms", "train_loss_final")
ADAPTER_REASON = ("the adapter check (save, reload, merge) runs in the single-device case of the same configuration; "
                  "a multi-process case checks training, memory and speed")
TENSOR_REASON = ("live tensor bytes and the memory model's prediction are for one process; a rank's tensors differ "
                 "from it (DDP's gradient buckets, FSDP's shards and gathered layers), which neither accounts for yet")

log = logging.getLogger("lorabench.progress")


# ----- a rank ---------------------------------------------------------------------
class RankParallel:
    """What one rank does differently: shard the model (FSDP) and wrap it for training (DDP).

    Args:
        strategy: ``ddp`` or ``fsdp``.
        device: this rank's device.
    """

    adapter_reason = ADAPTER_REASON
    tensor_reason = TENSOR_REASON

    def __init__(self, strategy: str, device) -> None:
        self.strategy = strategy
        self.device = device

    def shard(self, model):
        """FSDP2: every decoder layer, then the root, become ``fully_shard`` units (in place); DDP: unchanged."""
        if self.strategy != "fsdp":
            return model
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            layers = getattr(module, "layers", None)
            if layers is not None and hasattr(layers, "__iter__") and module is not model:
                for layer in layers:
                    fully_shard(layer)
                break
        fully_shard(model)
        return model

    def wrap(self, model):
        """DDP: the module the Trainer's steps call (gradients all-reduced in the backward pass); FSDP: the model."""
        if self.strategy != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


class RankGroup:
    """The ranks of a multi-process case as the worker command loop (:func:`lorabench.kinds.protocol.serve`) sees them:
    each command broadcast from rank 0, a barrier ending each step, every rank's record gathered on rank 0."""

    raises = True  # torchrun ends every rank when one fails

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.label = f"rank {rank}"

    def broadcast(self, command):
        import torch.distributed as dist

        box = [command]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, record):
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.gather_object(record, gathered if self.rank == 0 else None, dst=0)
        return gathered


def _rank_main(payload_path: str) -> int:
    """One rank of a multi-process case (``python -m lorabench.run.distributed PAYLOAD`` under torchrun): set up
    the process group, then serve the protocol's commands (:func:`lorabench.kinds.protocol.serve`) as one of the group."""
    import lorabench.run.quiet  # noqa: F401  (before the HF stack)
    import torch
    import torch.distributed as dist

    payload = pickle.loads(Path(payload_path).read_bytes())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    case: ResolvedCase = payload["case"]
    if case.device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(rank_threads(payload["threads"], local_world))
        dist.init_process_group("gloo")
    conn = None
    if rank == 0:
        host, port = os.environ[ENV_ADDRESS].rsplit(":", 1)
        conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[ENV_AUTHKEY]))
        send_logs(conn)
    # this rank's device and part; the integrations log from rank 0 alone; the threads are set above
    case = replace(case, device=device).with_options(
        report_to=case.options.report_to if rank == 0 else "none", cpu_threads=None,
        parallel=RankParallel(case.config.strategy, device))
    try:
        code = serve(conn, lambda: build_runner(case), group=RankGroup(rank))
    finally:
        if conn is not None:
            conn.close()
    if code == 0:
        dist.destroy_process_group()
    return code


def rank_threads(parent_threads: int, local_world: int) -> int:
    """The ranks on one machine share the launching process's threads (all cores, or an xdist worker's share)."""
    return max(1, parent_threads // max(1, local_world))


# ----- the pytest side ------------------------------------------------------------
class TorchrunRanks:
    """A multi-process case's ranks, as :class:`lorabench.run.launch.TorchrunLauncher` starts them: the mechanics
    alone (launch torchrun, wait for rank 0 to connect, end, how it died); the commands rank 0 obeys and
    broadcasts are the protocol's (:class:`lorabench.run.launch.WorkerRun`).

    Args:
        case: the resolved case, data included; every rank unpickles it from one payload file.
        quiet: the ranks filter libraries' notices (below ``-v``).
    """

    def __init__(self, case: ResolvedCase, *, quiet: bool = False) -> None:
        self.case = case
        self._quiet = quiet
        self._launcher: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._output: Path | None = None

    def start(self):
        """Launch torchrun; returns the connection rank 0 made back to this process."""
        import torch

        config = self.case.config
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self._workdir = tempfile.TemporaryDirectory(prefix="lorabench-ranks-")
        payload = Path(self._workdir.name) / "payload.pkl"
        threads = self.case.options.cpu_threads or torch.get_num_threads()  # the ranks share them
        payload.write_bytes(pickle.dumps({"case": self.case, "threads": threads}))
        self._output = Path(self._workdir.name) / "ranks.log"
        env = dict(os.environ, **{ENV_ADDRESS: "%s:%d" % listener.address, ENV_AUTHKEY: authkey.hex(),
                                  "OMP_NUM_THREADS": str(rank_threads(threads, config.world_size)),
                                  QUIET_ENV: "1" if self._quiet else "0"})
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc-per-node={config.world_size}", "-m", "lorabench.run.distributed", str(payload)]
        log.info("%s: launching %d ranks (%s): %s", self.case.case_id, config.world_size, config.strategy,
                 " ".join(command[1:5]))
        with self._output.open("w") as out:
            # its own session: stop() ends torchrun and every rank together
            self._launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        return _accept(listener, self._launcher, CONNECT_TIMEOUT_S, self._output)

    def result(self, records) -> CaseResult:
        """The case's record from every rank's (:func:`combine_ranks`)."""
        return combine_ranks([CaseResult.from_extra_info(data) for data in records], self.case.config.strategy)

    def stop(self, finished: bool) -> None:
        """Wait for torchrun to end (after ``finish``), or end it and every rank; remove the payload."""
        launcher = self._launcher
        if launcher is not None:
            try:
                launcher.wait(timeout=30 if finished else 1)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
            self._launcher = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def death_result(self) -> CaseResult:
        """The record of a case whose ranks ended without reporting: the launcher's exit and its last lines."""
        launcher = self._launcher
        try:
            code = launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            code = launcher.wait()
        tail = _tail(self._output)
        killed = "Signals.SIGKILL" in tail or "exitcode  : -9" in tail
        status = STATUS_DOES_NOT_FIT if killed else STATUS_ERROR
        reason = ("a rank was killed (SIGKILL), most likely by the kernel's out-of-memory killer" if killed
                  else f"torchrun exited with code {code}")
        return self.case.unmeasured(status=status, error=f"{reason}; last lines:\n{tail}")


def _accept(listener, launcher: subprocess.Popen, timeout_s: float, output: Path):
    """Wait for rank 0 to connect; fail with torchrun's output if it exits first or takes too long."""
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and launcher.poll() is None and time.monotonic() < deadline:
        thread.join(0.2)
    listener.close()
    if accepted:
        return accepted[0]
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        raise ChildFailed(f"rank 0 did not connect within {timeout_s:.0f} s; torchrun said:\n{_tail(output)}")
    raise ChildFailed(f"torchrun exited with code {launcher.returncode} before rank 0 connected:\n{_tail(output)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# ----- one record from W ranks ----------------------------------------------------------
def devices_missing(config, device) -> str:
    """Why a multi-process case cannot run here (one GPU per rank on CUDA), or ``""`` where it can."""
    if device.type != "cuda":
        return ""
    import torch

    visible = torch.cuda.device_count()
    if visible >= config.world_size:
        return ""
    return (f"{config.id} needs {config.world_size} CUDA devices (one per rank), {visible} visible here "
            "(CUDA_VISIBLE_DEVICES; a pytest-xdist worker sees one)")


def combine_ranks(ranks: list[CaseResult], strategy: str) -> CaseResult:
    """The case's record from every rank's: rank 0's, with per-device memory the largest rank's,
    throughput summed, the training loss averaged over ranks, and each rank's figures in ``details``.

    Args:
        ranks: the result records in rank order.
        strategy: ``ddp`` or ``fsdp``.

    Returns:
        A new record; the status is the first rank's that is not ``ok``, else ``ok``.
    """

    result = copy.deepcopy(ranks[0])
    world = len(ranks)
    for name in PER_DEVICE:
        values = [r.metrics[name] for r in ranks if name in r.metrics]
        if len(values) == world:
            source = ranks[0].sources.get(name, "")
            result.set(name, max(values), source=f"largest of {world} ranks: {source}".rstrip(": "))
    for name in SUMMED:
        values = [r.metrics[name] for r in ranks if name in r.metrics]
        if len(values) == world:
            result.set(name, sum(values), source=f"sum over {world} ranks, each on its own data")
    result.set("world_size", world, source=f"ranks launched by torchrun ({strategy})")
    if "tokens_per_s" in result.metrics:
        result.set("tokens_per_s_per_device", result.metrics["tokens_per_s"] / world,
                   source="tokens_per_s over world_size")
    curves = [r.loss_curve for r in ranks]
    if all(curves) and len({len(c) for c in curves}) == 1:
        result.loss_curve = [statistics.fmean(step) for step in zip(*curves)]
        record_train_loss(result, result.loss_curve, source=f"mean over {world} ranks")
    result.details["ranks"] = [{"rank": i, **{k: r.metrics[k] for k in RANK_FIGURES if k in r.metrics}}
                               for i, r in enumerate(ranks)]
    result.details["strategy"] = strategy
    bad = next((r for r in ranks if r.status != STATUS_OK), None)
    if bad is not None:
        result.status, result.error = bad.status, bad.error
    return result


def record_scaling(result: CaseResult, earlier: list[CaseResult], single_device_id: str | None) -> None:
    """``scaling_efficiency_pct``: the case's tokens/s over ``world_size`` times the single-device case's.

    Args:
        earlier: results so far in this session, searched for the single-device case of the same
            model, data set and configuration.
        single_device_id: that configuration's id (:func:`lorabench.matrix.single_device_id`).
    """
    name = "scaling_efficiency_pct"
    if single_device_id is None:
        result.set(name, None, reason="the run has no single-device configuration that trains the same thing")
        return
    reference = next((r for r in reversed(earlier) if (r.model, r.dataset, r.config_id)
                      == (result.model, result.dataset, single_device_id) and r.status == STATUS_OK), None)
    if reference is None or "tokens_per_s" not in reference.metrics or "tokens_per_s" not in result.metrics:
        result.set(name, None, reason=f"{single_device_id}, the single-device case, did not run before it in this session")
        return
    world = result.metrics["world_size"]
    result.set(name, 100.0 * result.metrics["tokens_per_s"] / (world * reference.metrics["tokens_per_s"]),
               source=f"tokens_per_s / ({world:.0f} x {single_device_id}.tokens_per_s): 100% is linear scaling")


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
