"""Data-parallel extraction on torch.distributed: the ranks split the images, gather the features.

Launched by ``torchrun`` (one process per GPU, or per CPU share; across machines with torchrun's
rendezvous), every rank loads the model and pools the loci of its own contiguous shard of the
images; the pooled rows are gathered with collectives (gloo on the CPU, NCCL on GPUs) in image
order, so the features equal a one-process run's. Rank 0 leads: it decides what is extracted
(the feature cache is read and written by rank 0 only), fits the probes once and reports. The
other ranks *serve*: they wait for rank 0's next command (extract model ``i``, or its
random-init twin), take their part, and stop when rank 0 says so.

Every extraction ends with a vote before any features travel: each rank says whether its part
worked, and a failure on any rank (bad input on its shard, out of memory at batch size 1, ...)
is raised on rank 0 with that rank's message, as the same kind of error (bad input stays a
usage error). A rank that dies outright breaks the collectives: the others stop with
:class:`RankLost` naming the step, and nothing is written (caches and reports are written by rank
0 after a complete gather, atomically).

No launcher of our own: torchrun starts the ranks; pytest-xdist stays the way to spread
*several* models over workers.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError
from .settings import DIST_BACKENDS

#: rank 0's commands to the serving ranks
STOP, EXTRACT, RANDOM_INIT = 0, 1, 2
#: bytes of a rank's failure message carried by the vote (longer ones are cut)
MESSAGE_BYTES = 4000
#: how long a rank waits in the gather of the features, which every rank reaches together
#: right after the vote (torch's own default for gloo)
TIMEOUT = datetime.timedelta(minutes=30)
#: how long the serving ranks wait for rank 0's next command, and every rank for the vote: rank 0
#: may fit probes or generate answers for hours between two commands, and ranks finish their
#: shards at different times. A rank that dies is noticed at once (its sockets close); only a
#: live rank that hangs is waited for this long (a launcher's time limit usually comes first).
CONTROL_TIMEOUT = datetime.timedelta(days=1)

#: this process's own bookkeeping: the gloo group the commands and votes travel on, whether
#: :func:`start` created the default group (only then does :func:`finish` destroy it), whether a
#: serving rank got rank 0's STOP, and why the group was abandoned
_STATE: dict[str, Any] = {"control": None, "started": False, "stopped": False, "broken": None}


class RankFailed(RuntimeError):
    """Another rank's part of an extraction failed; rank 0 raises the failure itself."""


class RankLost(RuntimeError):
    """A collective broke: another rank died or stopped answering."""


@dataclass(frozen=True)
class Group:
    """This process's place in the initialised default process group."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- commands from rank 0 -------------------------------------------------------------
    def send(self, command: int, model: int = -1, answer: bool = False, mask: list[int] | None = None) -> None:
        """Rank 0: tell the serving ranks what to do next: ``command`` for model ``model``, the
        loci marked 1 in ``mask`` (the model's loci in sorted order) and the answer if ``answer``."""
        check_intact()
        mask = list(mask or [])
        self._broadcast_ints([command, model, int(answer), len(mask)], "sending the next command")
        if mask:
            self._broadcast_ints(mask, "sending the loci to extract")

    def receive(self) -> tuple[int, int, bool, list[int]]:
        """A serving rank: rank 0's next command, ``(command, model index, answer, loci mask)``."""
        check_intact()
        command, model, answer, length = self._broadcast_ints([0, 0, 0, 0], "waiting for rank 0's next command")
        mask = self._broadcast_ints([0] * length, "receiving the loci to extract") if length else []
        if command == STOP:
            _STATE["stopped"] = True
        return int(command), int(model), bool(answer), [int(v) for v in mask]

    def _broadcast_ints(self, values: list[int], what: str) -> list[int]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64)
        _collective(what, lambda: dist.broadcast(tensor, src=0, group=_control()))
        return tensor.tolist()

    def same(self, value: str, what: str) -> None:
        """Every rank computed the same ``value`` (a hex digest); a rank that did not (other data
        or model files on its node) is a :class:`ConfigError` on every rank."""
        import torch
        import torch.distributed as dist

        mine = torch.from_numpy(np.frombuffer(value.encode().ljust(128, b"\0")[:128], dtype=np.uint8).copy())
        every = [torch.empty_like(mine) for _ in range(self.world)]
        _collective(f"comparing {what} across ranks", lambda: dist.all_gather(every, mine, group=_control()))
        found = [bytes(e.numpy()).rstrip(b"\0").decode() for e in every]
        differ = [r for r, v in enumerate(found) if v != found[0]]
        if differ:
            raise ConfigError(
                f"{what}: rank {differ[0]} of {self.world} does not see the same model, data and settings as "
                f"rank 0 (key {found[differ[0]][:12]} against {found[0][:12]}): every node must read the same "
                "files (a shared file system, or identical copies) and get the same options"
            )

    # -- the vote and the gather ----------------------------------------------------------
    def vote(self, failure: BaseException | None, what: str) -> None:
        """Every rank says whether its part of ``what`` worked; if one failed, every rank raises:
        rank 0 the failure itself (its own first, else the lowest failed rank's, with that rank
        named; bad input stays a :class:`ConfigError`), the others :class:`RankFailed`."""
        import torch
        import torch.distributed as dist

        mine = np.zeros(MESSAGE_BYTES + 2, dtype=np.uint8)
        if failure is not None:
            text = f"{type(failure).__name__}: {failure}".encode()[:MESSAGE_BYTES]
            mine[0] = 1
            mine[1] = 1 if isinstance(failure, ConfigError) else 0
            mine[2:2 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        local = torch.from_numpy(mine)
        every = [torch.empty_like(local) for _ in range(self.world)]
        _collective(f"the vote after {what}", lambda: dist.all_gather(every, local, group=_control()))
        votes = [v.numpy() for v in every]
        failed = [r for r, v in enumerate(votes) if v[0]]
        if not failed:
            return
        if not self.leader:
            raise RankFailed(f"rank {failed[0]} failed {what}")
        if failure is not None:
            raise failure
        rank = failed[0]
        text = bytes(votes[rank][2:]).rstrip(b"\0").decode(errors="replace")
        kind = ConfigError if votes[rank][1] else RankFailed
        raise kind(f"rank {rank} of {self.world} failed {what}: {text}")

    def gather_rows(self, rows: np.ndarray, sizes: list[int], what: str) -> np.ndarray:
        """Every rank's ``[sizes[rank], ...]`` rows, concatenated in rank order (image order)."""
        import torch
        import torch.distributed as dist

        longest = max(sizes)
        padded = np.zeros((longest, *rows.shape[1:]), dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        every: list[Any] = []

        def gather() -> None:  # the copies to the device too: an error there must not strand the others
            local = torch.from_numpy(padded).to(self.device)
            every.extend(torch.empty_like(local) for _ in range(self.world))
            dist.all_gather(every, local)

        _collective(f"gathering {what}", gather)
        return np.concatenate([e.cpu().numpy()[:size] for e, size in zip(every, sizes)])

    def smallest(self, value: int, what: str) -> int:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64)
        _collective(what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_control()))
        return int(tensor.item())

    @property
    def device(self) -> Any:
        """Where the gathered features travel: the CPU for gloo, this rank's GPU for NCCL."""
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def _control() -> Any:
    """The gloo group of the commands and votes (long timeout); the default group when this
    process did not make one."""
    return _STATE["control"]


def _collective(what: str, call: Any) -> None:
    """Run one collective. If it does not complete on this rank (a lost peer, or anything else
    raised inside it: a pytest-timeout signal, out of memory), the ranks can no longer agree on
    the next collective: the group is abandoned, so that the others stop at once too."""
    try:
        call()
    except BaseException as exc:
        abandon(f"{what} did not complete on this rank ({type(exc).__name__}: {exc})")
        if isinstance(exc, (RuntimeError, ConnectionError)):  # gloo/NCCL report a lost peer so
            raise RankLost(
                f"torch.distributed: {what} failed: another rank died or stopped answering, or the "
                f"collective itself failed ({exc}); see the other ranks' output for the cause"
            ) from exc
        raise


def abandon(reason: str) -> None:
    """Leave a group whose ranks no longer agree on the next collective: destroying it closes
    this rank's connections, so the other ranks' pending collectives fail at once."""
    if _STATE["broken"] is not None:
        return
    _STATE["broken"] = reason
    import contextlib

    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
    _STATE["control"] = None


def check_intact() -> None:
    """Raise :class:`RankLost` once the group was abandoned."""
    if _STATE["broken"] is not None:
        raise RankLost(f"torch.distributed: the process group was abandoned: {_STATE['broken']}")


def broken() -> str | None:
    return _STATE["broken"]


def stopped() -> bool:
    """A serving rank has received rank 0's STOP."""
    return bool(_STATE["stopped"])


def launched() -> bool:
    """This process was started by torchrun (or another launcher) as one of several ranks."""
    return _int_env("WORLD_SIZE", 1) > 1


def current() -> Group | None:
    """The initialised default process group when it has several ranks; ``None`` otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), _int_env("LOCAL_RANK", 0), dist.get_backend())


def start(device: str, backend: str = "auto") -> Group | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...)
    unless it is already initialised; ``None`` for a single process.

    ``backend`` ``auto`` is NCCL when this rank uses a GPU, gloo otherwise; NCCL asked for a CPU
    run, or on a machine without CUDA, is a :class:`ConfigError`."""
    group = current()
    if group is None and launched():
        group = _init(device, backend)
    if group is not None and _STATE["control"] is None:
        import torch.distributed as dist

        # every rank calls start(): the group of the commands and votes is made collectively
        _STATE["control"] = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return group


def _init(device: str, backend: str) -> Group | None:
    import torch
    import torch.distributed as dist

    if device.startswith("cuda:"):
        raise ConfigError(
            f"--mllm-device {device} under torchrun would put every rank on that GPU: use auto (or cuda), "
            "and each rank takes its own GPU (cuda:LOCAL_RANK)"
        )
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if backend == "nccl" and not on_gpu:
        raise ConfigError(
            f"--mllm-dist-backend nccl needs a GPU per rank, but this rank runs on the CPU "
            f"({'--mllm-device cpu' if device == 'cpu' else 'torch sees no GPU'}): use "
            "--mllm-dist-backend gloo (or auto) for CPU ranks"
        )
    chosen = backend if backend != "auto" else ("nccl" if on_gpu else "gloo")
    local_rank = _int_env("LOCAL_RANK", 0)
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank with LOCAL_RANK {local_rank} has no GPU of its own (torch sees "
                f"{torch.cuda.device_count()}): start at most that many processes per node "
                "(torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=chosen, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"torch.distributed could not start the {chosen} process group ({exc}); launch with "
            "torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ) from exc
    _STATE["started"] = True
    return current()


def rank_device(device: str, group: Group | None) -> str:
    """The device of this rank: ``auto``/``cuda`` become this rank's own GPU (``cuda:LOCAL_RANK``)
    whenever there is a GPU, whatever the backend."""
    if group is None or device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{group.local_rank}"


def finish() -> None:
    """Leave the process group :func:`start` created (one the caller made is left alone)."""
    if not _STATE["started"]:
        return
    _STATE["started"] = False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["control"] = None


def shards(n: int, batch_size: int, world: int) -> list[range]:
    """Contiguous image ranges, one per rank, in whole batches where there are enough batches
    (each batch then holds the same images as in a one-process run, so the features are the
    same to the bit); the larger shards come first."""
    if world > n:
        raise ConfigError(
            f"torchrun started {world} ranks for {n} images: every rank needs at least one image; "
            f"start at most {n} (torchrun --nproc-per-node / --nnodes)"
        )
    unit = batch_size
    while unit > 1 and -(-n // unit) < world:
        unit //= 2
    units = -(-n // unit)
    base, extra = divmod(units, world)
    out, start = [], 0
    for rank in range(world):
        stop = min(n, start + (base + (rank < extra)) * unit)
        out.append(range(start, stop))
        start = stop
    return out


def check_world(n: int, batch_size: int, group: Group | None) -> None:
    """Refuse more ranks than images before any model is loaded."""
    if group is not None:
        shards(n, batch_size, group.world)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None
