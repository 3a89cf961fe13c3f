"""Where distributed work runs: a dask LocalCluster started here, or an existing dask scheduler.

`--cluster local:N` starts N worker processes with one thread each, so every worker runs one task at
a time. On a CUDA machine each local worker is pinned to one GPU through CUDA_VISIBLE_DEVICES (worker
i gets the i-th visible GPU, round robin), so code on a worker always uses "cuda" and never chooses a
device itself. Workers of an existing cluster (`--scheduler tcp://host:8786`) are pinned by whoever
starts them (`CUDA_VISIBLE_DEVICES=1 dask worker ...`, see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import zlib
from collections.abc import Iterator

import distributed

from rankpipe.errors import InputError

log = logging.getLogger(__name__)

# Seconds to wait for an existing scheduler to answer.
CONNECT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Which dask cluster to use: exactly one of the two fields is set."""

    # Worker processes of a LocalCluster started for the run.
    local_workers: int | None = None
    # Address of a running dask scheduler, e.g. tcp://head:8786.
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if (self.local_workers is None) == (self.scheduler is None):
            raise InputError("give either --cluster local:N or --scheduler ADDRESS, not both")
        if self.local_workers is not None and self.local_workers < 1:
            raise InputError(f"--cluster local:N needs N >= 1, not {self.local_workers}")


def parse_cluster(cluster: str | None, scheduler: str | None) -> ClusterSpec | None:
    """The cluster of the `--cluster local:N` / `--scheduler ADDRESS` options; None when neither is given.

    Raises:
        InputError: both given, or a --cluster value that is not local:N.
    """
    if cluster is None and scheduler is None:
        return None
    if cluster is None:
        return ClusterSpec(scheduler=scheduler)
    if scheduler is not None:
        raise InputError("give either --cluster local:N or --scheduler ADDRESS, not both")
    kind, _, count = cluster.partition(":")
    if kind != "local" or not count.isdigit():
        raise InputError(f"--cluster {cluster!r} is not of the form local:N (N worker processes on this machine); "
                         "use --scheduler ADDRESS for a cluster started elsewhere")
    return ClusterSpec(local_workers=int(count))


@contextlib.contextmanager
def open_client(spec: ClusterSpec, device: str = "cpu") -> Iterator[distributed.Client]:
    """A dask Client on the cluster; a LocalCluster is started here and shut down on exit.

    Args:
        spec: the cluster.
        device: the device tasks will use; "cuda" pins each local worker to one GPU.

    Raises:
        InputError: the scheduler cannot be reached.
    """
    if not log.isEnabledFor(logging.DEBUG):
        # dask logs every connection at INFO; without --verbose only its warnings reach the user.
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if spec.scheduler is not None:
        try:
            client = distributed.Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise InputError(f"could not reach the dask scheduler at {spec.scheduler} ({e}); start one with "
                             "`dask scheduler` and pass the address it prints") from e
        with client:
            yield client
        return
    cluster = distributed.LocalCluster(n_workers=spec.local_workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        devices = _visible_gpus() if device.startswith("cuda") else []
        if devices:
            client.register_plugin(PinDevice(devices), name="rankpipe-pin-device")
            log.info("pinned %d local workers to GPUs %s", spec.local_workers, ",".join(devices))
        yield client


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class PinDevice(distributed.WorkerPlugin):
    """A dask worker plugin that shows each local worker one GPU (worker i: devices[i % len(devices)]).

    It runs when the plugin is registered, before any task, and again on a worker that replaces a
    lost one; CUDA reads CUDA_VISIBLE_DEVICES when first initialised, which no rankpipe task has done yet.
    """

    def __init__(self, devices: list[str]) -> None:
        self.devices = list(devices)

    def setup(self, worker) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError(f"worker {worker.name} initialised CUDA before it could be pinned to a GPU")
        index = int(worker.name) if str(worker.name).isdigit() else zlib.crc32(str(worker.name).encode())
        os.environ["CUDA_VISIBLE_DEVICES"] = self.devices[index % len(self.devices)]
