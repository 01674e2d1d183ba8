"""Rank arithmetic, master resolution and the local address choice."""

from __future__ import annotations

import threading
import time

import pytest

from loco_contract.config import RuntimeEnv
from loco_trainer.launcher import env_to_environ, local_runtime_env
from loco_contract.config import TrainerConfig
from loco_trainer.rendezvous import (
    RendezvousError,
    local_address,
    lookup_hosts_file,
    pick_backend,
    rank_info,
    resolve_master,
)


def test_global_rank_is_replica_times_nproc_plus_local_rank():
    env = RuntimeEnv(replica_index=2, num_replicas=3, nproc_per_worker=4)
    info = rank_info(env, 1)
    assert (info.rank, info.world_size, info.is_pod_leader) == (9, 12, False)
    assert rank_info(env, 0).is_pod_leader
    with pytest.raises(RendezvousError, match="LOCO_NPROC_PER_WORKER"):
        rank_info(env, 4)
    with pytest.raises(RendezvousError, match="LOCO_REPLICA_INDEX"):
        rank_info(RuntimeEnv(replica_index=3, num_replicas=3), 0)


def test_hosts_file_lookup_matches_any_alias(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# embedded cluster\n127.0.10.2 j-worker-0.j.ns.svc j-worker-0.j.ns.svc.cluster.local j-worker-0.j\n")
    assert lookup_hosts_file("j-worker-0.j", str(hosts)) == "127.0.10.2"
    assert lookup_hosts_file("j-worker-1.j", str(hosts)) is None
    assert lookup_hosts_file("x", str(tmp_path / "missing")) is None


def test_master_resolution_waits_for_the_hosts_entry(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("")

    def publish_later():
        time.sleep(0.5)
        hosts.write_text("127.0.10.7 j-worker-0.j.ns.svc\n")

    threading.Thread(target=publish_later, daemon=True).start()
    assert resolve_master("j-worker-0.j.ns.svc", str(hosts), timeout_s=60, poll_s=0.05) == "127.0.10.7"


def test_master_resolution_times_out_naming_the_host_and_source(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    with pytest.raises(RendezvousError, match="MASTER_ADDR 'j-worker-0.j' .*LOCO_LOCAL_HOSTS"):
        resolve_master("j-worker-0.j", str(hosts), timeout_s=0.2, poll_s=0.05)
    assert resolve_master("10.1.2.3") == "10.1.2.3"
    assert resolve_master("localhost", timeout_s=5) in ("127.0.0.1", "::1")


def test_local_address_prefers_pod_ip_then_loopback():
    assert local_address("127.0.5.5", pod_ip="127.0.9.9") == "127.0.9.9"
    assert local_address("127.0.5.5") == "127.0.0.1"


def test_local_runtime_env_round_trips_through_the_environment():
    env = local_runtime_env(3, TrainerConfig(job_name="j", namespace="n"), environ={})
    # --nproc N: N emulated pods of one process; --nproc-per-worker P groups them into pods of P
    assert (env.num_replicas, env.nproc_per_worker, env.master_addr, env.job_name) == (3, 1, "127.0.0.1", "j")
    assert env.master_port > 0 and env.status_port == 0
    assert RuntimeEnv.from_environ(env_to_environ(env)) == env
    pods = local_runtime_env(4, TrainerConfig(job_name="j", namespace="n"), environ={}, nproc_per_worker=2)
    assert (pods.num_replicas, pods.nproc_per_worker, pods.replica_index) == (2, 2, 0)
    with pytest.raises(ValueError, match="--nproc-per-worker 2 must be >= 1 and divide --nproc 3"):
        local_runtime_env(3, TrainerConfig(job_name="j", namespace="n"), environ={}, nproc_per_worker=2)


def test_a_taken_master_port_in_the_ephemeral_range_says_so_and_what_to_choose():
    import socket

    from loco_trainer.rendezvous import RankInfo, RendezvousError, _tcp_store, ephemeral_port_range

    ephemeral = ephemeral_port_range()
    if ephemeral is None:
        pytest.fail("this test needs Linux's /proc/sys/net/ipv4/ip_local_port_range")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # the kernel picks from the ephemeral range
        holder.listen(1)
        port = holder.getsockname()[1]
        info = RankInfo(rank=0, local_rank=0, world_size=1, replica_index=0, nproc_per_worker=1)
        with pytest.raises(RendezvousError) as err:
            _tcp_store("127.0.0.1", port, info, timeout_s=5)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message
    assert f"ephemeral range {ephemeral[0]}-{ephemeral[1]}" in message
    assert f"MASTER_PORT below {ephemeral[0] - 1000}" in message


def test_a_cuda_job_keeps_gloo_for_its_cpu_tensors() -> None:
    """The loop's control all-reduces, the probes and the clock estimate use CPU tensors: on CUDA the
    default group must route them to gloo (a NCCL-only group refuses them), as torch reads the spec."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    def devices(spec: str) -> dict[str, str]:
        return BackendConfig(dist.Backend(spec)).get_device_backend_map()

    assert devices(pick_backend(torch.device("cuda", 0))) == {"cpu": "gloo", "cuda": "nccl"}
    assert devices(pick_backend(torch.device("cpu")))["cpu"] == "gloo"
