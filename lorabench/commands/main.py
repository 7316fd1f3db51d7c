"""``python -m lorabench``: compare stored runs and render reports.

    python -m lorabench compare [RUN_A] [RUN_B] [--fail] [--all] [--skip-broken] [--gate-step-cpu-time] [--csv F] ...
    python -m lorabench report [RUN] [--out reports/] [--skip-broken]
    python -m lorabench merge RUN RUN... [--out FILE]
    python -m lorabench fit --model M [--memory 24GiB] [--batch-size B] [--seq-len T] [--set K=V] [--json F]
    python -m lorabench list [--matrix FILE] [--model M] [--dataset D] [--set K=V]

A RUN is a stored file, a run number (``3`` or ``0003``), a save name or a commit id
prefix; by default the two latest runs (compare) or the latest (report). A stored run that
cannot be read stops the choice, and one with a diverged, errored or timed-out case fails
``--fail``; ``--skip-broken`` passes over both and prints each one with the reason. An
interrupted run is always passed over, with the reason printed (lorabench.storage.history).
Exit codes: 0 fine, 1 a regression (or a compared run with a case that did not finish) with
``--fail``, 2 bad input (a message says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

from lorabench.errors import HistoryError, LorabenchError
from lorabench import yamlio
from lorabench.commands.merge import default_output, merge_runs
from lorabench.config import parse_override
from lorabench.errors import HistoryError
from lorabench.errors import StorageError
from lorabench.errors import ThresholdError
from lorabench.gates.compare import Tolerances, parse_tolerances
from lorabench.gates.compare import compare_runs
from lorabench.matrix import build_matrix
from lorabench.paths import read_text
from lorabench.run.quiet import quiet_libraries
from lorabench.storage.history import latest_runs, run_problem, select_run
from lorabench.storage.history import latest_runs, select_run
from lorabench.storage.history import read_json, select_run

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2
NEGATIVE_SIZE = re.compile(r"^-\d+(\.\d+)?\s*[A-Za-z]*$")  # a negative number, or size, is a value, not an option


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except LorabenchError as exc:
        print(f"lorabench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _path(value: str) -> Path:
    """A path option: not empty, ``~`` expanded."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a path")
    return Path(os.path.expanduser(value))


def _parser() -> argparse.ArgumentParser:
    # the docstring's reST literals (``x``) read as plain words on the terminal
    parser = argparse.ArgumentParser(prog="python -m lorabench", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--storage", type=storage_path, default=Path(".benchmarks"), metavar="DIR",
                         help="pytest-benchmark file storage: a folder, or file://FOLDER as --benchmark-storage "
                              "takes it (default .benchmarks)")
    storage.add_argument("--skip-broken", action="store_true",
                         help="choose the latest runs among those that can be read and whose cases all finished "
                              "(each run passed over is printed with the reason)")

    cmp = sub.add_parser("compare", parents=[storage], help="compare every metric of two stored runs")
    cmp.add_argument("run_a", nargs="?", help="the earlier run (default: the second latest)")
    cmp.add_argument("run_b", nargs="?", help="the later run (default: the latest)")
    cmp.add_argument("--fail", action="store_true",
                     help="exit 1 when any metric regressed, or a compared run has a case that diverged or errored")
    cmp.add_argument("--thresholds", type=_path, default=None, metavar="FILE",
                     help="tolerances from its 'compare:' section (default thresholds.yaml where it exists, else the "
                          "built-in ones; a FILE given must exist)")
    cmp.add_argument("--gate-step-cpu-time", action="store_true",
                     help="gate speed on the raw step CPU time (step_cpu_ms) as well as on the step/control ratio: "
                          "for a quiet runner, where a slowdown that the control shares (a torch upgrade) must fail")
    cmp.add_argument("--all", action="store_true",
                     help="show every row, informational and unchanged ones too (default: the gated rows that "
                          "moved, and the verdict)")
    cmp.add_argument("--csv", type=_path, metavar="FILE", help="write every row as CSV")
    cmp.add_argument("--json", type=_path, metavar="FILE", help="write every row and warning as JSON")
    cmp.add_argument("--markdown", type=_path, metavar="FILE",
                     help="write a summary for a pull-request comment: the verdict, the gated changes, the "
                          "rest collapsed (with --all: every row)")
    cmp.set_defaults(command=_compare)

    rep = sub.add_parser("report", parents=[storage], help="write summary.md, summary.html and plots for a run")
    rep.add_argument("run", nargs="?", help="the run (default: the latest)")
    rep.add_argument("--out", type=_path, default=Path("reports"), metavar="DIR", help="output folder (default reports)")
    rep.set_defaults(command=_report)

    mrg = sub.add_parser("merge", parents=[storage], help="join stored runs of one commit (--shard slices) into one run")
    mrg.add_argument("runs", nargs="+", metavar="RUN", help="stored runs to join (files, numbers, names, commit prefixes)")
    mrg.add_argument("--out", type=Path, metavar="FILE",
                     help="where to write the joined run (default: the next NNNN_merged_<commit>.json in STORAGE/merged)")
    mrg.set_defaults(command=_merge)
    fit = sub.add_parser("fit", help="predict each configuration's peak memory (no weights, no GPU) against budgets")
    fit.add_argument("--model", action="append", required=True, metavar="SPEC",
                     help="preset:NAME, a zoo name, a checkpoint directory or a cached hub id; repeatable")
    fit.add_argument("--memory", action="append", default=[], metavar="SIZE",
                     help="a budget, e.g. 24GiB, checked against the predicted device total on CUDA (tensor bytes "
                          "on the CPU); repeatable; without it the table shows the predicted peaks only")
    fit._negative_number_matcher = NEGATIVE_SIZE  # '--memory -5GiB' reaches the size check, not 'expected one argument'
    fit.add_argument("--batch-size", type=int, metavar="B", help="rows per micro-batch (default: the model's)")
    fit.add_argument("--seq-len", type=int, metavar="T", help="tokens per row (default: the model's)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration field in every case, as in the bench")
    fit.add_argument("--matrix", type=Path, metavar="FILE",
                     help="configurations from a matrix file (default: the built-in ones, rank sweep and "
                          "multi-process cases left out)")
    fit.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                     help="whose kernels and runtime terms (default cuda)")
    fit.add_argument("--json", type=Path, metavar="FILE", help="write every case as JSON")
    fit.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR", help="where the chart goes (default reports)")
    fit.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own configuration code")
    fit.set_defaults(command=_fit)
    lst = sub.add_parser("list", help="print the configurations (built-in or --matrix) with their fields and markers")
    lst.add_argument("--matrix", type=_path, metavar="FILE", help="configurations from a matrix file (default: the built-in ones)")
    lst.add_argument("--model", action="append", default=[], metavar="SPEC", help="as the bench takes it; repeatable")
    lst.add_argument("--dataset", action="append", default=[], metavar="SPEC", help="as the bench takes it; repeatable")
    lst.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration field in every case, as in the bench")
    lst.set_defaults(command=_list)
    return parser


def storage_path(text: str) -> Path:
    """``--storage``: a folder, or pytest-benchmark's ``file://FOLDER`` form (``file:///abs``, ``file://./rel``).

    Raises:
        argparse.ArgumentTypeError: another storage scheme (pytest-benchmark's elasticsearch) or an empty value.
    """
    if text.startswith("file://"):
        text = text[len("file://"):]  # what pytest-benchmark's load_storage strips
    elif "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: only pytest-benchmark's file storage can be read; give a folder or file://FOLDER")
    if not text:
        raise argparse.ArgumentTypeError("empty path; give a folder or file://FOLDER")
    return Path(text).expanduser()


def _compare(args) -> int:
    from lorabench.report import compare_output  # deferred: imports rich

    for option, path in (("--csv", args.csv), ("--json", args.json), ("--markdown", args.markdown)):
        if path is not None:
            check_output_file(path, option)
    tolerances = _tolerances(args.thresholds)  # a bad file is refused before any run is read
    skipped: list[str] = []
    latest = lambda n: latest_runs(n, args.storage, skip_broken=args.skip_broken, skipped=skipped)  # noqa: E731
    if args.run_a and args.run_b:
        run_a, run_b = select_run(args.run_a, args.storage), select_run(args.run_b, args.storage)
    elif args.run_a:
        run_a, run_b = select_run(args.run_a, args.storage), latest(1)[0]
    else:
        run_a, run_b = latest(2)
    for line in skipped:
        print(f"skipped run {line}")
    runs = [run_a] if run_b.path == run_a.path else [run_a, run_b]
    problems = [(run, problem) for run in runs if (problem := run_problem(run))]
    if args.skip_broken and problems:
        run, problem = problems[0]
        raise HistoryError(f"run {run.label} was named, and {problem}; name another run")
    tolerances = dataclasses.replace(tolerances, gate_step_cpu_time=args.gate_step_cpu_time)
    comparison = compare_runs(run_a, run_b, tolerances)
    for line in compare_output.terminal(comparison, show_all=args.all):
        print(line)
    write_markdown = functools.partial(compare_output.write_markdown, show_all=args.all)
    for path, write in ((args.csv, compare_output.write_csv), (args.json, compare_output.write_json),
                        (args.markdown, write_markdown)):
        if path is not None:
            write(comparison, path)
    for run, problem in problems:
        print(f"run {run.label}: {problem}" + ("; this fails --fail (--skip-broken compares the latest runs whose "
                                               "cases all finished)" if args.fail else ""))
    return EXIT_REGRESSION if args.fail and (comparison.regressions or problems) else EXIT_OK


def _tolerances(path: Path | None):
    """The ``compare:`` section of the thresholds file (its gates are the bench's business): of ``path``,
    which must exist, or of ./thresholds.yaml where it exists; else the built-in tolerances."""

    if path is None:
        path = Path("thresholds.yaml")
        if not os.path.lexists(path):
            return Tolerances()
    try:
        data = yamlio.load(read_text(path, "--thresholds", ThresholdError))
    except yamlio.YamlProblem as exc:
        raise ThresholdError(f"{exc.where(str(path))}: {exc.problem}") from None
    section = data.get("compare") if isinstance(data, dict) else None
    return parse_tolerances(section or {}, str(path))


def _merge(args) -> int:
    from lorabench.storage.atomic import write_run  # deferred: imports pytest_benchmark

    if args.out is not None:
        check_output_file(args.out, "merge --out")
    paths = [select_run(spec, args.storage).path for spec in args.runs]
    merged = merge_runs([(str(p), read_json(p)) for p in paths])
    out = args.out or default_output(args.storage, merged.data)
    check_output_file(out, "merge --out")
    try:
        write_run(out, merged.data)
    except FileExistsError as exc:
        raise HistoryError(str(exc)) from None
    for line in merged.warnings:
        print(f"warning: {line}")
    print(f"wrote {out}: {len(merged.data['benchmarks'])} benchmarks from {len(paths)} runs")
    return EXIT_OK


def _report(args) -> int:
    from lorabench.report.pages import write_report  # deferred: imports rich

    check_output_dir(args.out, "report --out")
    skipped: list[str] = []
    run = select_run(args.run, args.storage) if args.run else latest_runs(
        1, args.storage, skip_broken=args.skip_broken, skipped=skipped)[0]
    for line in skipped:
        print(f"skipped run {line}")
    for line in run.read_warnings:
        print(f"warning: {line}")
    for path in write_report(run, args.out, progress=_progress):
        print(f"wrote {path}")
    return EXIT_OK


def _list(args) -> int:
    from lorabench.commands.listing import list_lines  # deferred: imports rich

    overrides = dict(parse_override(text) for text in args.overrides)
    matrix = build_matrix(matrix_file=args.matrix, models=args.model, datasets=args.dataset, overrides=overrides)
    for line in list_lines(matrix):
        print(line)
    return EXIT_OK


def _progress(line: str) -> None:
    """A long command's progress, on stderr: stdout keeps its results."""
    print(line, file=sys.stderr, flush=True)


def check_output_dir(directory: Path, option: str) -> None:
    """A folder a command will write into, made now if needed: refused before any work when it cannot be.

    Raises:
        StorageError: naming the option, the folder and why (a component that is a file, read-only, ...).
    """
    from lorabench.storage.atomic import describe_os_error  # deferred: imports pytest_benchmark

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{option} {directory}: cannot be made a folder ({describe_os_error(exc)})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"{option} {directory}: cannot write there (read-only or not permitted)")


def check_output_file(path: Path, option: str) -> None:
    """A file a command will write: its folder made now if needed, and not a folder itself.

    Raises:
        StorageError: naming the option, the file and why.
    """

    if path.is_dir():
        raise StorageError(f"{option} {path}: a folder, not a file; name the file to write")
    check_output_dir(path.absolute().parent, f"{option} {path}: its folder")


def _fit(args) -> int:
    from lorabench.commands.fit import Budget, check_outputs, check_shape, plot, render, run_fit, write_json  # deferred: imports rich, torch

    quiet_libraries()  # the libraries' deprecation notices and optional-kernel messages say nothing about the answer
    check_shape(args.batch_size, args.seq_len)
    check_outputs(args.json, args.out)  # before the predictions, not after them
    budgets = [Budget.parse(text) for text in args.memory]
    overrides = dict(parse_override(text) for text in args.overrides)
    matrix = build_matrix(matrix_file=args.matrix, overrides=overrides)
    # the memory model predicts one device: the multi-process (DDP, FSDP) configurations are left out
    configs = [c for c in matrix.configs if (args.matrix or "sweep" not in c.tags) and c.world_size == 1]
    cases = run_fit(args.model, budgets, batch_size=args.batch_size, seq_len=args.seq_len, configs=configs,
                    target=args.device, trust_remote_code=args.trust_remote_code)
    for line in render(cases, budgets):
        print(line)
    if args.json is not None:
        write_json(cases, args.json)
        print(f"wrote {args.json}")
    for path in plot(cases, budgets, args.out):
        print(f"wrote {path}")
    return EXIT_OK
