"""A multi-host run proven on one machine: two network namespaces joined by a veth pair are two
Open MPI hosts (each with a hostname of its own), mpirun launches across them with a hostfile
and an rsh agent that enters the other namespace, and MPI's TCP traffic is held to the veth
subnet. Oracle: SWAP on 2 hosts x 2 ranks ends with the weights of the 1-host 4-rank run.

Needs root, `ip netns` and `unshare`; where they are missing the test is skipped and says why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mpi_util import MPIRUN, PYTHON, REPO_ROOT, run_job

# Private addresses of the two test hosts only; nothing is routed outside the pair.
SUBNET = "10.250.{}.0/24"
SWAP_4_RANKS = ["data.dataset=cifar10_jpg", "data.train_subset=128", "data.test_subset=100", "model.name=resnet9",
                "model.kwargs={width: 4}", "optim.batch_size=16", "schedule.epochs=3", "eval.batch_size=100",
                "eval.bn_update_batches=2", "run.progress=false", "method.workers=2", "method.stop_accuracy=null",
                "method.phase2_epochs=1", "method.phase2_batch_size=8"]
AGENT = """#!/bin/sh
# Open MPI's rsh agent for the test hosts: "agent HOST COMMAND" runs COMMAND (one string, as
# ssh would) in HOST's network namespace, with HOST as its hostname.
host=$1; shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host && exec $*"
"""


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts(tmp_path):
    """Namespaces swa<pid>a and swa<pid>b on 10.250.N.1 and .2, with a hostfile and an rsh agent."""
    if os.geteuid() != 0:
        pytest.skip("two network namespaces as hosts need root (ip netns add); this test runs as a user")
    missing = [tool for tool in ("ip", "unshare") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"two network namespaces as hosts need {' and '.join(missing)} (iproute2, util-linux)")
    tag = f"swa{os.getpid() % 100000}"
    hosts, net = [f"{tag}a", f"{tag}b"], os.getpid() % 200 + 20
    addresses = [f"10.250.{net}.1", f"10.250.{net}.2"]
    veths = [f"{tag}v0", f"{tag}v1"]
    made = []
    try:
        for host in hosts:
            done = _sh("ip", "netns", "add", host)
            if done.returncode != 0:
                pytest.skip(f"ip netns add failed (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
            made.append(host)
        steps = [("ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])]
        for host, veth, address in zip(hosts, veths, addresses):
            steps += [("ip", "link", "set", veth, "netns", host),
                      ("ip", "-n", host, "addr", "add", f"{address}/24", "dev", veth),
                      ("ip", "-n", host, "link", "set", veth, "up"), ("ip", "-n", host, "link", "set", "lo", "up")]
        for step in steps:
            done = _sh(*step)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr}"
        for host in hosts:  # `ip netns exec` mounts /etc/netns/HOST/hosts over /etc/hosts
            Path(f"/etc/netns/{host}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{host}/hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(addresses, hosts)))
        agent = tmp_path / "netns_agent"
        agent.write_text(AGENT)
        agent.chmod(0o755)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{h} slots=2\n" for h in hosts))
        yield {"hosts": hosts, "agent": agent, "hostfile": hostfile, "subnet": SUBNET.format(net)}
    finally:
        for host in made:  # deleting a namespace deletes its end of the veth pair, and so both
            _sh("ip", "netns", "del", host)
            shutil.rmtree(f"/etc/netns/{host}", ignore_errors=True)


def _swap_cmd(run_dir: Path) -> list:
    return [PYTHON, REPO_ROOT / "experiments/swap_cifar.py", "--config",
            REPO_ROOT / "configs/swap/cifar10_resnet9_swap_smoke.yaml", "--run-dir", run_dir, *SWAP_4_RANKS]


@pytest.mark.timeout(900)
def test_two_hosts_of_two_ranks_equal_one_host_of_four(two_hosts, tmp_path):
    one_host = tmp_path / "one_host"
    env = {"OMP_NUM_THREADS": "1"}
    run_job([*MPIRUN, "-np", 4, "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", *_swap_cmd(one_host)],
            timeout_s=400, env=env)

    first, subnet = two_hosts["hosts"][0], two_hosts["subnet"]
    mpirun = [*MPIRUN, "-np", 4, "--hostfile", two_hosts["hostfile"], "--display-map",
              "--mca", "plm_rsh_agent", two_hosts["agent"],  # reaches the second host's namespace
              "--mca", "btl", "tcp,vader,self", "--mca", "btl_tcp_if_include", subnet,
              "--mca", "oob_tcp_if_include", subnet, "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    two = tmp_path / "two_hosts"
    # mpirun itself runs on the first host: in its namespace, under its hostname.
    result = run_job(["ip", "netns", "exec", first, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                      first, *mpirun, *_swap_cmd(two)], timeout_s=400, env=env)
    for host in two_hosts["hosts"]:  # Open MPI placed 2 ranks on each host
        assert re.search(rf"Data for node: {host}\s+Num slots: 2\s+Max slots: 0\s+Num procs: 2", result.stdout), \
            result.stdout[-3000:]

    for name in ("final_model.pt", "final_train_model.pt"):
        a, b = torch.load(one_host / name), torch.load(two / name)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ between 1 host and 2 hosts, e.g. {differ[:3]}"
