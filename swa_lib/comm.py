"""One thin communication layer: Horovod, torch.distributed or a single process, one interface.

Every collective the library needs goes through a `Communicator`, so a training loop reads
like the single-process program plus a few `Distributed:` lines. Backends:
  horovod  Horovod 0.28 over MPI (the papers' setup); groups are dynamic process sets.
  torch    torch.distributed (gloo on CPU, NCCL on GPU); groups are `new_group`s.
  single   one process, every collective is the identity, so loops run without mpirun.

Example, under `mpirun -np 4` (auto picks Horovod), HWA with 2 models of 2 processes each:
    comm = init_comm(); group = comm.split(2)
    loss.backward(); allreduce_gradients_(comm, model, group); optimizer.step()
    average_model_(comm, model)  # every H steps: the 2 models' average
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
from dataclasses import dataclass, field

import torch
from torch import nn

from swa_lib.averaging.flat import averaged_tensors
from swa_lib.launch import BACKENDS, LaunchInfo, detect_launch, resolve_backend

__all__ = ["BACKENDS", "LaunchInfo", "detect_launch", "resolve_backend", "init_comm", "Communicator", "Group",
           "SingleProcess", "average_model_", "allreduce_gradients_"]  # the first four live in swa_lib.launch

REDUCE_OPS = ("mean", "sum", "max")
# A dead peer normally ends the job through the launcher; this bounds the wait when it does not.
TIMEOUT_S = float(os.environ.get("SWA_COMM_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class Group:
    """A subset of world ranks that runs collectives together (made by `Communicator.split`)."""
    ranks: tuple[int, ...]  # global ranks, sorted
    index: int              # which group of its split this is (0..K-1); 0 for the world
    rank: int               # this process's rank inside the group, -1 if not a member
    size: int
    handle: object = field(default=None, compare=False, repr=False)    # ProcessSet / ProcessGroup / None
    mpi_comm: object = field(default=None, compare=False, repr=False)  # Horovod backend, members only


class Communicator:
    """Collectives over the world or a `Group`. Backends implement the `_...` hooks on one flat
    buffer; this class checks arguments, skips groups of one and coalesces tensor lists (one
    buffer per dtype and device), so a model's ~60 gradients cost one collective call."""
    backend = "single"

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int,
                 world_handle=None, world_mpi_comm=None):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.world = Group(tuple(range(size)), 0, rank, size, world_handle, world_mpi_comm)
        self._splits: dict[int, tuple[Group, ...]] = {1: (self.world,)}
        self._closed = False

    def split_all(self, num_groups: int) -> tuple[Group, ...]:
        """All `num_groups` contiguous blocks of ranks, created once on every rank, in order."""
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
                or self.size % num_groups:
            raise ValueError(f"cannot split world size {self.size} into num_groups={num_groups!r} "
                             f"equal groups: num_groups must be a positive divisor of {self.size}")
        if num_groups not in self._splits:
            group_size = self.size // num_groups
            blocks = [tuple(range(g * group_size, (g + 1) * group_size)) for g in range(num_groups)]
            mine = self.rank // group_size
            handles, mpi_comm = self._new_group_handles(blocks, mine)
            self._splits[num_groups] = tuple(
                Group(b, g, self.rank - b[0] if g == mine else -1, group_size, handles[g],
                      mpi_comm if g == mine else None)
                for g, b in enumerate(blocks))
        return self._splits[num_groups]

    def split(self, num_groups: int) -> Group:
        """This process's group when the world is cut into `num_groups` contiguous blocks.

        Group g holds ranks [g*G, (g+1)*G), G = size // num_groups. Every rank creates all groups
        in the same order (Horovod and torch require it); cached, so a second call creates nothing."""
        return self.split_all(num_groups)[self.rank * num_groups // self.size]

    def _member_group(self, group: Group | None) -> Group:
        group = self.world if group is None else group
        if group.rank < 0:
            raise ValueError(f"rank {self.rank} is not a member of the group with ranks {group.ranks}")
        return group

    def allreduce_(self, tensors: list[torch.Tensor], op: str = "mean", group: Group | None = None) -> None:
        """Reduce `tensors` in place over `group` (default world) with op "mean", "sum" or "max"."""
        if op not in REDUCE_OPS:
            raise ValueError(f"allreduce op {op!r} is not one of {REDUCE_OPS}")
        if op == "mean" and any(not (t.is_floating_point() or t.is_complex()) for t in tensors):
            raise ValueError(f"allreduce op 'mean' needs floating-point tensors, got dtypes "
                             f"{sorted({str(t.dtype) for t in tensors})}")
        group = self._member_group(group)
        if group.size > 1:
            self._coalesced(tensors, lambda flat: self._allreduce_flat(flat, op, group), copy_back=True)

    def broadcast_(self, tensors: list[torch.Tensor], root: int = 0, group: Group | None = None) -> None:
        """Overwrite `tensors` in place with the values of group rank `root` (a rank inside `group`)."""
        group = self._member_group(group)
        if not 0 <= root < group.size:
            raise ValueError(f"broadcast root {root} is not a rank inside a group of size {group.size}")
        if group.size > 1:
            self._coalesced(tensors, lambda flat: self._broadcast_flat(flat, group.ranks[root], group),
                            copy_back=group.rank != root)

    def barrier(self, group: Group | None = None) -> None:
        """Wait until every rank of `group` (default world) has arrived."""
        group = self._member_group(group)
        if group.size > 1:
            self._barrier(group)

    def allgather_object(self, obj, group: Group | None = None) -> list:
        """A list with each group member's picklable `obj`, in group-rank order (small objects only)."""
        group = self._member_group(group)
        return [obj] if group.size == 1 else self._allgather_object(obj, group)

    def shutdown(self) -> None:
        """Release the backend (Horovod, torch: after a barrier); safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    @staticmethod
    def _coalesced(tensors, collective, copy_back: bool) -> None:
        # One call per (device, dtype) instead of per tensor, for a copy in and out of a flat buffer.
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        with torch.no_grad():
            for bucket in buckets.values():
                if len(bucket) == 1 and bucket[0].is_contiguous():
                    collective(bucket[0])
                    continue
                flat = torch.cat([t.reshape(-1) for t in bucket])
                collective(flat)
                if copy_back:
                    offset = 0
                    for t in bucket:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()

    # -- backend hooks; a single process never reaches the collectives (groups of one) ------
    def _new_group_handles(self, blocks, mine): return [None] * len(blocks), None  # + my MPI comm

    def _allreduce_flat(self, flat, op, group): raise NotImplementedError
    def _broadcast_flat(self, flat, root_global, group): raise NotImplementedError
    def _barrier(self, group): raise NotImplementedError
    def _allgather_object(self, obj, group): raise NotImplementedError
    def _shutdown(self): pass


class SingleProcess(Communicator):
    """One process: world size 1, every collective is the identity."""
    backend = "single"

    def __init__(self):
        super().__init__(rank=0, size=1, local_rank=0, local_size=1)


class Horovod(Communicator):
    """Horovod over MPI, or over Gloo under `horovodrun --gloo` (then `mpi` is None). Groups are
    dynamic process sets, with an mpi4py sub-communicator beside them under MPI."""
    backend = "horovod"

    def __init__(self, hvd, mpi=None):
        # A peer stuck longer than the timeout makes Horovod shut down with an error everywhere.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(int(min(60, TIMEOUT_S / 2))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(TIMEOUT_S)))
        # Distributed: dynamic mode, because the groups are only known when split() is called.
        # Horovod's docs warn of slight extra synchronisation; 2 CPU ranks here showed none.
        hvd.init(process_sets="dynamic")  # on MPI_COMM_WORLD, so Horovod ranks are MPI ranks
        self.hvd, self.mpi = hvd, mpi
        self._ops = {"mean": hvd.Average, "sum": hvd.Sum, "max": hvd.Max}
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(),
                         hvd.global_process_set, None if mpi is None else mpi.COMM_WORLD)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())

    def _new_group_handles(self, blocks, mine):
        subcomm = None
        if self.mpi is not None:
            subcomm = self.mpi.COMM_WORLD.Split(color=mine, key=self.rank)  # Distributed: MPI's view of my group
            members = tuple(subcomm.allgather(self.rank))
            if members != blocks[mine]:
                raise RuntimeError(f"MPI split gave ranks {members}, expected {blocks[mine]}")
        # Distributed: every rank adds every set, in the same order (Horovod blocks until all have).
        # Sets must be given as rank lists: Horovod cannot add a set from an MPI comm after init.
        sets = [self.hvd.add_process_set(list(b)) for b in blocks]
        if sets[mine].rank() != self.rank - blocks[mine][0]:  # read now: not safe once peers shut down
            raise RuntimeError(f"Horovod process set {blocks[mine]} reports rank {sets[mine].rank()}")
        return sets, subcomm

    @staticmethod
    def _name(kind, flat, group):  # "noname" ops are numbered per process: ranks could disagree.
        # Fixed per call shape, so Horovod's response cache skips negotiation on repeats.
        return f"swa.{kind}.g{group.ranks[0]}-{group.ranks[-1]}.{str(flat.dtype)[6:]}.{flat.numel()}"

    def _allreduce_flat(self, flat, op, group):
        self.hvd.allreduce_(flat, op=self._ops[op], name=self._name(f"allreduce.{op}", flat, group),
                            process_set=group.handle)

    def _broadcast_flat(self, flat, root_global, group):
        # Horovod's root_rank is a global rank that must belong to the set.
        self.hvd.broadcast_(flat, root_global, name=self._name(f"broadcast.{root_global}", flat, group),
                            process_set=group.handle)

    def _barrier(self, group):
        self.hvd.barrier(process_set=group.handle)

    def _allgather_object(self, obj, group):  # Horovod's own takes no process set; MPI's does
        if group.mpi_comm is not None:
            return group.mpi_comm.allgather(obj)
        # Gloo: pickled bytes through Horovod's tensor allgather, which takes a process set and
        # rows of a different count per rank.
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        name = f"swa.allgather_object.g{group.ranks[0]}-{group.ranks[-1]}"
        sizes = self.hvd.allgather(torch.tensor([data.numel()]), name=name + ".sizes", process_set=group.handle)
        gathered = self.hvd.allgather(data, name=name + ".bytes", process_set=group.handle)
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in gathered.split(sizes.tolist())]

    def _shutdown(self):
        self.hvd.barrier()  # a peer still reading process-set info fails once a rank shut down
        self.hvd.shutdown()


class TorchDistributed(Communicator):
    """torch.distributed: env:// under torchrun; under mpirun the address travels over mpi4py."""
    backend = "torch"

    def __init__(self, launch: LaunchInfo):
        import torch.distributed as dist
        self.dist = dist
        self.timeout = datetime.timedelta(seconds=TIMEOUT_S)
        pg_backend = os.environ.get("SWA_TORCH_BACKEND", "nccl" if torch.cuda.is_available() else "gloo")
        if launch.launcher == "torchrun":
            rank, size = launch.rank, launch.size
            local_rank, local_size = launch.local_rank or 0, launch.local_size or 1
            store = None  # env:// reads MASTER_ADDR/MASTER_PORT set by torchrun
        elif launch.launcher is None:
            rank, size, local_rank, local_size = 0, 1, 0, 1
            store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=self.timeout)
        elif launch.launcher == "srun":  # srun without an MPI plugin: no MPI to carry the address
            rank, size = launch.rank, launch.size
            local_rank, local_size = launch.local_rank or 0, launch.local_size or 1
            if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
                raise RuntimeError("backend 'torch' under srun needs MASTER_ADDR and MASTER_PORT (the first "
                                   "node's name and a free port; see examples/slurm/), or srun --mpi=pmix")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, rank == 0,
                                  timeout=self.timeout)
        else:
            rank, size, local_rank, local_size, store = self._mpi_rendezvous()
        if pg_backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(pg_backend, store=store, rank=-1 if store is None else rank,
                                world_size=-1 if store is None else size, timeout=self.timeout)
        super().__init__(dist.get_rank(), dist.get_world_size(), local_rank, local_size, dist.group.WORLD)

    def _mpi_rendezvous(self):
        # Distributed: mpirun sets no MASTER_ADDR/PORT. Rank 0 opens a TCPStore on a free port
        # (port 0: no race for the number) and tells the others over MPI.
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise RuntimeError("backend 'torch' under an MPI launcher needs mpi4py to exchange the "
                               "rendezvous address: pip install mpi4py") from err
        world = MPI.COMM_WORLD
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)  # ranks on this host
        local_rank, local_size = local.rank, local.size
        single_host = world.allreduce(local_size, op=MPI.MIN) == world.size
        store = address = None
        if world.rank == 0:
            host = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_host else socket.gethostname())
            store = self.dist.TCPStore(host, int(os.environ.get("MASTER_PORT", 0)), world.size, True,
                                       timeout=self.timeout, wait_for_workers=False)
            address = (host, store.port)
        host, port = world.bcast(address, root=0)
        if world.rank != 0:
            store = self.dist.TCPStore(host, port, world.size, False, timeout=self.timeout)
        return world.rank, world.size, local_rank, local_size, store

    def _new_group_handles(self, blocks, mine):
        # Distributed: new_group is collective over the world, so every rank creates every group.
        handles = [self.dist.new_group(list(b), timeout=self.timeout) for b in blocks]
        return [h if g == mine else None for g, h in enumerate(handles)], None

    def _allreduce_flat(self, flat, op, group):
        # gloo has no AVG: sum, then divide (one pass over the buffer).
        reduce_op = self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM
        self.dist.all_reduce(flat, op=reduce_op, group=group.handle)
        if op == "mean":
            flat.div_(group.size)

    def _broadcast_flat(self, flat, root_global, group):
        self.dist.broadcast(flat, src=root_global, group=group.handle)

    def _barrier(self, group):
        self.dist.barrier(group=group.handle)

    def _allgather_object(self, obj, group):
        out = [None] * group.size
        self.dist.all_gather_object(out, obj, group=group.handle)
        return out

    def _shutdown(self):
        self.dist.barrier()
        self.dist.destroy_process_group()


def init_comm(backend: str = "auto") -> Communicator:
    """Start the communication backend and return its `Communicator`.

    Args:
        backend: "horovod", "torch", "single", or "auto": env SWA_COMM_BACKEND if set, else
            Horovod under mpirun/srun/PMI with more than one process, torch under torchrun,
            else single. SWA_TORCH_BACKEND picks gloo or nccl. SWA_COMM_TIMEOUT_S (default
            600) bounds how long a rank waits for a stuck peer in either backend (torch's
            timeout, Horovod's stall shutdown); raise it if rank 0 alone does long work.
    Also gives each rank an equal share of this host's cores (unless OMP_NUM_THREADS is set),
    since ranks on one host otherwise oversubscribe it.
    """
    launch = detect_launch()
    name = resolve_backend(backend, launch)
    if launch.launcher not in (None, "torchrun", "horovodrun"):
        # A rank waiting in MPI spins on a core unless told to yield; with the cores already
        # given to compute threads (below) it steals them from peers (the cost on 2 shared cores:
        # results/allreduce_cpu.md, "Spinning or yielding"). Read at MPI_Init.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if name == "horovod":
        gloo = launch.launcher == "horovodrun"  # horovodrun --gloo: no MPI job to join
        try:
            import horovod.torch as hvd
            MPI = None
            if not gloo:
                from mpi4py import MPI  # before hvd.init, so MPI starts with mpi4py's MPI_THREAD_MULTIPLE
        except ImportError as err:
            raise RuntimeError(f"backend 'horovod' needs horovod (with PyTorch and MPI) and mpi4py, "
                               f"but the import failed ({err}). Build Horovod with "
                               f"tools/build_horovod.sh; install mpi4py with pip install mpi4py") from err
        comm = Horovod(hvd, MPI)
    elif name == "torch":
        comm = TorchDistributed(launch)
    else:
        comm = SingleProcess()
    if name != "single" and launch.size and comm.size != launch.size:  # e.g. Horovod built without MPI
        hint = ("start MPI programs with srun --mpi=pmix (srun --mpi=list shows the choices)"
                if launch.launcher == "srun" else "see tools/build_horovod.sh")
        raise RuntimeError(f"backend {name!r} sees {comm.size} processes but the launcher "
                           f"({launch.launcher}) started {launch.size}; {hint}")
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // comm.local_size))  # ranks share this host's cores
    return comm


def average_model_(comm: Communicator, model: nn.Module, group: Group | None = None,
                   buffers: bool = True) -> None:
    """Replace `model`'s parameters (and floating-point buffers) by their mean over `group`.

    Integer buffers such as BatchNorm's num_batches_tracked are left alone. One coalesced call."""
    comm.allreduce_(averaged_tensors(model, buffers), "mean", group)  # Distributed: one allreduce, whole model


def allreduce_gradients_(comm: Communicator, model: nn.Module, group: Group | None = None) -> None:
    """Average `p.grad` over `group` for every parameter that requires grad; call after backward.

    A grad that is None becomes zeros first: every rank must send the same layout, or they hang.
    A group of one changes nothing. Unlike hvd.DistributedOptimizer, the loop can skip the call
    per phase (SWAP phase 2)."""
    if (comm.world if group is None else group).size == 1:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    comm.allreduce_(grads, "mean", group)  # Distributed: data-parallel gradient mean
