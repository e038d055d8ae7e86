"""Per-rank program: swa_lib.comm's collectives against oracles every rank computes itself.

Usage: mpirun -np N python tests/mpi_scripts/comm_oracles.py BACKEND     (N = 2 or 4)
Every rank can generate every rank's tensors (a generator seeded by seed and rank), so it
knows each expected result without communicating. Exits non-zero on the first mismatch;
prints "OK rank=R ..." at the end.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from rank_harness import check, run_rank
from swa_lib.comm import allreduce_gradients_, average_model_, init_comm

STEPS = 6
PER_RANK_BATCH = 8


def rank_tensors(seed: int, rank: int, ints: bool = True) -> list[torch.Tensor]:
    """The tensors rank `rank` contributes; float32, float64, a non-contiguous view, int64."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64),
           torch.randn(4, 3, generator=g).t()]
    return out + [torch.randint(-50, 50, (6,), generator=g)] if ints else out


def max_diff(xs, ys) -> float:
    return max(float((x.detach().double() - y.detach().double()).abs().max())
               for x, y in zip(xs, ys, strict=True))


def check_collectives(comm, group, seed: int, tag: str) -> None:
    """Oracle 1: allreduce mean/sum/max, broadcast and allgather_object inside `group`."""
    reduce = {"mean": lambda s: s.mean(0) if s.is_floating_point() else None,
              "sum": lambda s: s.sum(0), "max": lambda s: s.max(0).values}
    for op in ("mean", "sum", "max"):
        mine = rank_tensors(seed, comm.rank, ints=op != "mean")
        comm.allreduce_(mine, op, group)
        everyone = [rank_tensors(seed, r, ints=op != "mean") for r in group.ranks]
        expected = [reduce[op](torch.stack(ts)) for ts in zip(*everyone)]
        err = max_diff(mine, expected)
        check(err < 1e-6, f"{tag}: allreduce {op} differs from the oracle by {err}")
    root = group.size - 1  # a rank inside the group, not a global rank
    mine = rank_tensors(seed + 1, comm.rank)
    comm.broadcast_(mine, root=root, group=group)
    err = max_diff(mine, rank_tensors(seed + 1, group.ranks[root]))
    check(err == 0, f"{tag}: broadcast from group rank {root} differs by {err}")
    gathered = comm.allgather_object({"rank": comm.rank}, group)
    check(gathered == [{"rank": r} for r in group.ranks], f"{tag}: allgather_object gave {gathered}")
    comm.barrier(group)


def check_split(comm) -> None:
    """Oracle 2: contiguous groups, each reducing on its own; the cache; the size check."""
    num_groups = 2
    g = comm.split(num_groups)
    size_g = comm.size // num_groups
    expect = tuple(range(comm.rank // size_g * size_g, (comm.rank // size_g + 1) * size_g))
    check((g.ranks, g.index, g.rank, g.size) == (expect, comm.rank // size_g, comm.rank % size_g, size_g),
          f"split(2) gave {g}, expected ranks {expect}")
    check(comm.split(num_groups) is g, "split(2) twice returned a different group")
    others = [h for h in comm.split_all(num_groups) if h.index != g.index]
    check(all(h.rank == -1 for h in others), f"non-member groups {others} claim a rank")
    try:
        comm.allreduce_([torch.ones(1)], "sum", others[0])
    except ValueError:
        pass
    else:
        raise AssertionError(f"rank {comm.rank} reduced in group {others[0].ranks} it does not belong to")
    check_collectives(comm, g, seed=20 + g.index, tag=f"group {g.index}")
    # The groups' means must differ from each other (each group reduced only its own ranks).
    mean = rank_tensors(30, comm.rank, ints=False)[0]
    comm.allreduce_([mean], "mean", g)
    means = comm.allgather_object(mean)
    for r, m in enumerate(means):
        same_group = r // size_g == g.index
        check(torch.equal(m, mean) == same_group, f"rank {r}'s group mean vs mine: same group={same_group}")
    if size_g > 1:  # groups of one: the paper's SWAP phase 2, one process per worker
        solo = comm.split(comm.size)
        mine = rank_tensors(40, comm.rank)
        comm.allreduce_(mine, "sum", solo)
        check(max_diff(mine, rank_tensors(40, comm.rank)) == 0, "allreduce in a group of one changed values")
    try:
        comm.split(3)
    except ValueError as err:
        check(str(comm.size) in str(err) and "3" in str(err), f"split(3) error does not name sizes: {err}")
    else:
        raise AssertionError(f"split(3) on {comm.size} ranks did not raise ValueError")


def mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    layers = [nn.Linear(8, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def sgd_step(model, opt, x, y, comm=None, group=None) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if comm is not None:
        allreduce_gradients_(comm, model, group)  # Distributed: the call under test
    opt.step()


def check_data_parallel(comm, group, seed: int, tag: str) -> None:
    """Oracle 3: G ranks with batch b each equal one process with batch G*b on the same samples."""
    model = mlp()
    model[0].bias.requires_grad_(False)  # frozen parameters are skipped
    reference = copy.deepcopy(model)
    opt, ref_opt = sgd(model), sgd(reference)
    g = torch.Generator().manual_seed(seed)
    global_batch = group.size * PER_RANK_BATCH
    xs = torch.randn(STEPS, global_batch, 8, generator=g)
    ys = torch.randint(0, 3, (STEPS, global_batch), generator=g)
    mine = slice(group.rank * PER_RANK_BATCH, (group.rank + 1) * PER_RANK_BATCH)
    for step in range(STEPS):
        sgd_step(model, opt, xs[step, mine], ys[step, mine], comm, group)
        sgd_step(reference, ref_opt, xs[step], ys[step])
    err = max_diff(model.parameters(), reference.parameters())
    moved = max_diff(model.parameters(), mlp().parameters())
    check(err < 1e-5, f"{tag}: data-parallel params differ from the big-batch reference by {err}")
    check(moved > 1e-2, f"{tag}: training moved the params by only {moved}; the oracle is vacuous")


def check_missing_grads(comm, group) -> None:
    """A parameter whose grad is None on some ranks is averaged with zeros there (no hang)."""
    model = nn.Module()
    model.p, model.q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    model.p.grad = torch.full((3,), float(comm.rank + 1))
    model.q.grad = None if comm.rank % 2 else torch.full((2,), 10.0 * (comm.rank + 1))
    allreduce_gradients_(comm, model, group)
    expect_p = sum(r + 1 for r in group.ranks) / group.size
    expect_q = sum(10.0 * (r + 1) for r in group.ranks if r % 2 == 0) / group.size
    check(torch.allclose(model.p.grad, torch.full((3,), expect_p)), f"p.grad {model.p.grad} != {expect_p}")
    check(model.q.grad is not None and torch.allclose(model.q.grad, torch.full((2,), expect_q)),
          f"q.grad {model.q.grad} != {expect_q}")


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_sync_switch(comm) -> None:
    """Oracle 4: without gradient sync models diverge; after average_model_ and with sync they agree."""
    model = mlp(bn=True)
    opt = sgd(model)
    g = torch.Generator().manual_seed(777 + comm.rank)  # different data on every rank
    batches = [(torch.randn(PER_RANK_BATCH, 8, generator=g),
                torch.randint(0, 3, (PER_RANK_BATCH,), generator=g)) for _ in range(2 * STEPS)]
    for x, y in batches[:STEPS // 2]:
        sgd_step(model, opt, x, y)  # SWAP phase 2: no communication
    before = comm.allgather_object([flat_params(model), model[1].running_mean.clone()])
    spread = max(float((b[0] - before[0][0]).abs().max()) for b in before)
    check(spread > 1e-4, f"models without gradient sync did not diverge (spread {spread})")
    bn = model[1]
    bn.num_batches_tracked.fill_(100 + comm.rank)
    average_model_(comm, model)
    err = max_diff([flat_params(model), bn.running_mean], [sum(t) / comm.size for t in zip(*before)])
    check(err < 1e-6, f"average_model_ differs from the mean of the gathered models by {err}")
    check(int(bn.num_batches_tracked) == 100 + comm.rank, "average_model_ touched an integer buffer")
    # The momentum buffers diverged too; averaging them keeps the synced updates identical.
    comm.allreduce_([opt.state[p]["momentum_buffer"] for p in model.parameters()], "mean")
    averaged = flat_params(model)
    for x, y in batches[STEPS:]:
        sgd_step(model, opt, x, y, comm)
    after = comm.allgather_object(flat_params(model))
    spread = max(float((a - after[0]).abs().max()) for a in after)
    check(spread < 1e-6, f"models with gradient sync drifted apart by {spread}")
    check(float((after[0] - averaged).abs().max()) > 1e-3, "synced training did not change the model")


def main() -> None:
    backend = sys.argv[1]
    comm = init_comm(backend)
    check(comm.backend == backend, f"init_comm({backend!r}) gave backend {comm.backend!r}")
    check(comm.world.ranks == tuple(range(comm.size)) and comm.world.rank == comm.rank, f"world {comm.world}")
    check(0 <= comm.local_rank < comm.local_size <= comm.size,
          f"local rank {comm.local_rank} of {comm.local_size}")
    check_collectives(comm, comm.world, seed=10, tag="world")
    check_split(comm)
    check_data_parallel(comm, comm.world, seed=50, tag="world")
    check_missing_grads(comm, comm.world)
    group = comm.split(2)
    if group.size > 1:  # HWA: data-parallel inside each of two groups, each on its own data
        check_data_parallel(comm, group, seed=60 + group.index, tag=f"group {group.index}")
        check_missing_grads(comm, group)
    check_sync_switch(comm)
    print(f"OK rank={comm.rank} backend={backend} np={comm.size}", flush=True)
    comm.shutdown()


if __name__ == "__main__":
    run_rank(main)
