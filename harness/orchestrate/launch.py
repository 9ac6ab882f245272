"""One run across processes on this machine: the harness command line started in N processes
by torch's elastic launcher; each process then trains its share (harness/run/distributed.py)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from harness.run.distributed import is_main


def launch(nproc: int, entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """`entry(ARGV)` (the harness command line, handed down by harness.cli) in `nproc` processes
    on this machine through torch's elastic launcher (what torchrun runs), as `torchrun
    --standalone --nproc-per-node NPROC -m harness.cli ARGV` would. Returns rank 0's exit status
    (an error was printed by the rank that met it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # else the launcher sets it, with a warning
    # the rank that failed printed its one line; the launcher's own report of it is a traceback
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"harness-{os.getpid()}", max_restarts=0)
    try:
        elastic_launch(config, _rank_main)(entry, argv)
    except ChildFailedError as e:
        failures = e.failures
        return next((f.exitcode for _, f in sorted(failures.items()) if f.exitcode > 0), 1)
    return 0


def _rank_main(entry: Callable[[list[str]], int], argv: list[str]) -> None:
    """One rank of `launch`: the harness command line; only rank 0 prints progress."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    status = entry(argv)
    if status:
        sys.exit(status)
