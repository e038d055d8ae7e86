"""Oracle tests for swa_lib.stacked: K models in one process against K models trained one by one.

The oracle is plain torch written here: K ResNet-9s (width 4, BN in train mode), each with its own
seed, data stream and SGD (momentum, nesterov, weight decay, a changing LR), trained one after the
other. SequentialWorkers must give its weights bitwise. StackedWorkers runs the same arithmetic
with other kernels (vmap turns each conv into one grouped conv over K, and the matmuls and BN
reductions into batched ones), so the float32 sums are added in another order; those rounding
differences (~1e-7 relative per op) carry through the steps. After 5 steps the largest difference
seen in any weight or BN statistic was 2.4e-7 (absolute, values of order 0.01-1; this CPU, torch
2.14); TOL (atol 2e-6 plus rtol 1e-5) is about 10x that, while every compared tensor moved by more
than 20x TOL in training (checked), so a model that did not train, or another model's weights, fail.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from swa_lib.averaging.workers import allreduce_average_, average_state_dicts, average_workers, combine_averages
from swa_lib.stacked import SequentialWorkers, StackedWorkers, build_workers, stacked_batches

K, STEPS, BATCH, SIZE = 3, 5, 8, 16
LRS = [0.05, 0.1, 0.1, 0.08, 0.04]
SGD_ARGS = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
TOL = dict(rtol=1e-5, atol=2e-6)


def build(k: int) -> torch.nn.Module:
    torch.manual_seed(k)
    return build_model("resnet9", 10, width=4).train()


def make_sgd(params):
    return torch.optim.SGD(params, lr=LRS[0], **SGD_ARGS)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """X [K, STEPS, B, 3, S, S], Y [K, STEPS, B]: model k's own stream, from its own generator."""
    xs, ys = [], []
    for k in range(K):
        g = torch.Generator().manual_seed(100 + k)
        xs.append(torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=g))
        ys.append(torch.randint(0, 10, (STEPS, BATCH), generator=g))
    return torch.stack(xs), torch.stack(ys)


def train_oracle(k: int, x: torch.Tensor, y: torch.Tensor):
    model = build(k)
    optimizer = torch.optim.SGD(model.parameters(), lr=LRS[0], **SGD_ARGS)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LRS[step]
        optimizer.zero_grad()
        F.cross_entropy(model(x[k, step]), y[k, step]).backward()
        optimizer.step()
    return model, optimizer


def train_workers(vectorised: bool, x, y):
    workers = build_workers([build(k) for k in range(K)], make_sgd, vectorised=vectorised)
    for step in range(STEPS):
        losses, out = workers.train_step(x[:, step], y[:, step], F.cross_entropy, lr=LRS[step])
        assert losses.shape == (K,) and out.shape == (K, BATCH, 10)
    return workers


@pytest.fixture(scope="module")
def trained():
    x, y = data()
    oracles = [train_oracle(k, x, y) for k in range(K)]
    return {"x": x, "y": y, "oracle": [m for m, _ in oracles], "oracle_opt": [o for _, o in oracles],
            "sequential": train_workers(False, x, y), "stacked": train_workers(True, x, y)}


def assert_states_close(got: dict, want: dict, exact: bool) -> None:
    assert set(got) == set(want)
    for name in want:
        if exact or not want[name].is_floating_point():
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["sequential", "stacked"])
def test_each_model_equals_its_oracle_including_bn_running_stats(trained, path):
    for k in range(K):
        assert_states_close(trained[path].model_state_dict(k), trained["oracle"][k].state_dict(),
                            exact=path == "sequential")


def test_training_moved_every_tensor_far_beyond_the_tolerance(trained):
    """Otherwise the stacked comparison could pass with models that did not train."""
    for k in range(K):
        start, end = build(k).state_dict(), trained["oracle"][k].state_dict()
        for name, t in end.items():
            if t.is_floating_point():
                moved = (t - start[name]).abs().max().item()
                tol = TOL["atol"] + TOL["rtol"] * t.abs().max().item()
                assert moved > 20 * tol, f"{name} moved only {moved}, tolerance {tol}"
        assert end["features.0.1.num_batches_tracked"].item() == STEPS


@pytest.mark.parametrize("path", ["sequential", "stacked"])
def test_a_wrong_model_order_is_detected(trained, path):
    for k in range(K):
        with pytest.raises(AssertionError):
            assert_states_close(trained[path].model_state_dict(k), trained["oracle"][(k + 1) % K].state_dict(),
                                exact=path == "sequential")


@pytest.mark.parametrize("path", ["sequential", "stacked"])
def test_extracted_model_evaluates_like_the_oracle(trained, path):
    x_test = torch.randn(K, 6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    workers = trained[path]
    with torch.no_grad():
        together = workers.eval()(x_test)
        for k in range(K):
            oracle = trained["oracle"][k].eval()
            want = oracle(x_test[k])
            alone = workers.module(k)
            assert not alone.training
            got = alone(x_test[k])
            if path == "sequential":
                assert torch.equal(got, want) and torch.equal(together[k], want)
            else:
                torch.testing.assert_close(got, want, **TOL)
                torch.testing.assert_close(together[k], want, **TOL)
            oracle.train()
    workers.train()


@pytest.mark.parametrize("path", ["sequential", "stacked"])
def test_in_process_average_is_the_mean_of_the_oracle_models(trained, path):
    oracle_states = [m.state_dict() for m in trained["oracle"]]
    by_hand = {name: torch.stack([s[name] for s in oracle_states]).mean(0) for name in oracle_states[0]
               if oracle_states[0][name].is_floating_point()}
    got = average_workers(trained[path])
    if path == "sequential":
        assert_states_close(got, average_state_dicts(oracle_states), exact=True)
    for name, want in by_hand.items():
        torch.testing.assert_close(got[name], want, **TOL)
    assert not torch.allclose(got["classifier.weight"], oracle_states[0]["classifier.weight"], **TOL)


def test_one_sgd_over_stacked_tensors_is_k_sgd_optimizers():
    """SGD's update is elementwise: stepping [K, ...] tensors is stepping K models, bitwise."""
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 8, 3, 3), (16,), (10, 33)]
    start = [torch.randn(K, *s, generator=g) for s in shapes]
    grads = [[torch.randn(K, *s, generator=g) for s in shapes] for _ in range(STEPS)]
    stacked = [t.clone().requires_grad_() for t in start]
    separate = [[t[k].clone().requires_grad_() for t in start] for k in range(K)]
    opt = make_sgd(stacked)
    opts = [make_sgd(ps) for ps in separate]
    for step in range(STEPS):
        for p, grad in zip(stacked, grads[step]):
            p.grad = grad.clone()
        opt.step()
        for k in range(K):
            for p, grad in zip(separate[k], grads[step]):
                p.grad = grad[k].clone()
            opts[k].step()
    for k in range(K):
        for p_stacked, p_alone in zip(stacked, separate[k]):
            assert torch.equal(p_stacked[k], p_alone)
            assert not torch.equal(p_stacked[(k + 1) % K], p_alone)


@pytest.mark.parametrize("path", ["sequential", "stacked"])
def test_optimizer_state_of_model_k_is_its_own_sgd_state(trained, path):
    for k in range(K):
        got = trained[path].optimizer_state_dict(k)["state"]
        want = trained["oracle_opt"][k].state_dict()["state"]
        assert set(got) == set(want)
        for i in want:
            if path == "sequential":
                assert torch.equal(got[i]["momentum_buffer"], want[i]["momentum_buffer"])
            else:
                torch.testing.assert_close(got[i]["momentum_buffer"], want[i]["momentum_buffer"], **TOL)


@pytest.mark.parametrize("src, dst", [(StackedWorkers, SequentialWorkers), (SequentialWorkers, StackedWorkers)])
def test_checkpoint_of_one_path_resumes_in_the_other(src, dst):
    """SWAP phase 2 in miniature: K workers start from one model with its momentum, then a checkpoint
    of one path resumes in the other; both must match K plain models continuing from the same start."""
    x, y = data()
    model, optimizer = train_oracle(0, x, y)  # "phase 1"
    first = src([model] * K, make_sgd)
    for k in range(K):
        first.load_optimizer_state_dict(k, optimizer.state_dict())
    first.train_step(x[:, 0], y[:, 0], F.cross_entropy, lr=0.05)
    second = dst([build(k) for k in range(K)], make_sgd)  # other weights, overwritten by the checkpoint
    second.load_state_dict(first.state_dict())
    second.train_step(x[:, 1], y[:, 1], F.cross_entropy, lr=0.05)
    for k in range(K):
        alone = build(0)
        alone.load_state_dict(model.state_dict())
        alone_opt = make_sgd(list(alone.parameters()))
        # A copy: load_state_dict keeps the given momentum tensors, which K oracles would then share.
        alone_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for step in range(2):
            for group in alone_opt.param_groups:
                group["lr"] = 0.05
            alone_opt.zero_grad()
            F.cross_entropy(alone(x[k, step]), y[k, step]).backward()
            alone_opt.step()
        assert_states_close(second.model_state_dict(k), alone.state_dict(), exact=False)


def test_combined_average_weighs_each_process_by_its_model_count():
    """Processes holding 1 and 3 models: the world mean is the plain mean over all 4 models, not
    the mean of the two process means."""
    g = torch.Generator().manual_seed(5)
    models = [{"w": torch.randn(4, 3, generator=g), "n": torch.tensor(7)} for _ in range(4)]
    means = [average_state_dicts(models[:1]), average_state_dicts(models[1:])]
    got = combine_averages(means, counts=[1, 3])
    torch.testing.assert_close(got["w"], torch.stack([m["w"] for m in models]).mean(0))
    assert torch.equal(got["n"], torch.tensor(7))
    unweighted = average_state_dicts(means)
    assert not torch.allclose(unweighted["w"], got["w"])


class SumWithOthers:
    """A stand-in communicator: allreduce-sum adds what the other processes would contribute."""

    def __init__(self, others: list[list[torch.Tensor]]):
        self.others = others

    def allreduce_(self, tensors, op="mean", group=None):
        assert op == "sum"
        for i, t in enumerate(tensors):
            for other in self.others:
                t += other[i]


def test_allreduce_average_matches_the_pure_combination():
    g = torch.Generator().manual_seed(6)
    means = [{"w": torch.randn(5, generator=g), "b": torch.randn(2, generator=g)} for _ in range(3)]
    counts = [2, 1, 4]
    others = [[means[p]["w"] * counts[p], means[p]["b"] * counts[p], torch.tensor([float(counts[p])],
                                                                                  dtype=torch.float64)]
              for p in (1, 2)]
    mine = {name: t.clone() for name, t in means[0].items()}
    allreduce_average_(SumWithOthers(others), mine, counts[0])
    want = combine_averages(means, counts)
    for name in want:
        torch.testing.assert_close(mine[name], want[name])


def test_stacked_batches_stack_k_streams_in_order():
    loaders = [[(torch.full((2, 3), float(k)), torch.full((2,), k))] * 2 for k in range(K)]
    batches = list(stacked_batches(loaders))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (K, 2, 3) and y.shape == (K, 2)
    assert [x[k, 0, 0].item() for k in range(K)] == list(range(K))


def test_input_with_the_wrong_number_of_models_is_refused(trained):
    with pytest.raises(ValueError, match="one per model"):
        trained["stacked"](torch.zeros(K + 1, 2, 3, SIZE, SIZE))
