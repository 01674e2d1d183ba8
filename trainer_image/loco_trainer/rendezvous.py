"""Rendezvous: find the master, pick this process's network address, join the process group.

Ranks: ``rank = replica_index * nproc_per_worker + local_rank`` and
``world_size = num_replicas * nproc_per_worker``. Replica 0's local rank 0 is global rank 0 and
hosts the TCP store on ``MASTER_ADDR:MASTER_PORT``.

Name resolution: with ``LOCO_LOCAL_HOSTS`` (the embedded cluster's DNS stand-in) the hosts file is
consulted, else the system resolver. Pods start in any order, so resolution is retried until a
timeout, then fails with an error naming the host and the source consulted.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loco_contract.config import RuntimeEnv

log = logging.getLogger(__name__)


#: Store key rank 0 sets once every rank has connected to its store (see :func:`_tcp_store`).
ALL_JOINED_KEY = "loco/all-joined"


class RendezvousError(RuntimeError):
    """The process group could not be formed (the message says what was tried)."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    replica_index: int
    nproc_per_worker: int

    @property
    def is_pod_leader(self) -> bool:
        """Local rank 0 speaks for its pod (progress endpoint, termination message)."""
        return self.local_rank == 0


def rank_info(env: RuntimeEnv, local_rank: int) -> RankInfo:
    """The global rank and world size of local rank ``local_rank`` in the pod described by ``env``."""
    if not 0 <= local_rank < env.nproc_per_worker:
        raise RendezvousError(f"local rank {local_rank} outside 0..{env.nproc_per_worker - 1} (LOCO_NPROC_PER_WORKER)")
    if not 0 <= env.replica_index < env.num_replicas:
        raise RendezvousError(
            f"LOCO_REPLICA_INDEX {env.replica_index} outside 0..{env.num_replicas - 1} (LOCO_NUM_REPLICAS)"
        )
    return RankInfo(
        rank=env.replica_index * env.nproc_per_worker + local_rank,
        local_rank=local_rank,
        world_size=env.world_size,
        replica_index=env.replica_index,
        nproc_per_worker=env.nproc_per_worker,
    )


def lookup_hosts_file(name: str, hosts_file: str) -> str | None:
    """The address of ``name`` in a hosts file (``IP NAME...`` lines, ``#`` comments), or None."""
    try:
        with open(hosts_file, encoding="utf-8") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and name in fields[1:]:
            return fields[0]
    return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def resolve_master(name: str, hosts_file: str = "", timeout_s: float = 300.0, poll_s: float = 0.5) -> str:
    """The IP address of ``name``, retried until ``timeout_s`` (pods appear in any order)."""
    if _is_ip(name):
        return name
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        if hosts_file:
            address = lookup_hosts_file(name, hosts_file)
            if address:
                return address
            last_error = f"not listed in LOCO_LOCAL_HOSTS file {hosts_file}"
        else:
            try:
                return socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
            except socket.gaierror as exc:
                last_error = f"DNS: {exc}"
        if time.monotonic() >= deadline:
            raise RendezvousError(
                f"cannot resolve MASTER_ADDR {name!r} after {timeout_s:.0f}s ({last_error}); "
                f"check that replica 0's pod exists and the headless service publishes not-ready addresses"
            )
        time.sleep(poll_s)


def local_address(master_ip: str, pod_ip: str = "") -> str:
    """The address this process's collectives should use: POD_IP when set; 127.0.0.1 when the
    master is a loopback address (local runs); else the source address of a route to the master."""
    if pod_ip:
        return pod_ip
    if ipaddress.ip_address(master_ip).is_loopback:
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in master_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master_ip, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def _interface_of(address: str) -> str | None:
    """The network interface holding ``address`` (Linux), or None."""
    if ipaddress.ip_address(address).is_loopback:
        return "lo"
    try:
        import fcntl
        import struct

        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == address:
                    return name
    except (ImportError, OSError):
        return None
    return None


def init_process_group(env: RuntimeEnv, info: RankInfo, backend: str, timeout_s: float = 600.0,
                       resolve_timeout_s: float = 300.0, store_timeout_s: float | None = None) -> str:
    """Join the job's default process group; returns the local address chosen. ``timeout_s`` bounds
    every collective of the group; ``store_timeout_s`` (default ``timeout_s``) the wait for the
    other ranks at the rendezvous store.

    Gloo binds its pairs to the interface named by ``GLOO_SOCKET_IFNAME``; unless the user set it,
    it is set to the interface holding the chosen address, so pods sharing a host (each with its
    own loopback IP in the embedded cluster) and multi-homed nodes pick the right one.
    """
    master_ip = resolve_master(env.master_addr, env.local_hosts, timeout_s=resolve_timeout_s)
    address = local_address(master_ip, env.pod_ip)
    if "gloo" in backend and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = _interface_of(address)
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    log.info(
        "rendezvous: rank %d/%d (replica %d, local rank %d) -> %s (%s):%d via %s, backend %s",
        info.rank, info.world_size, info.replica_index, info.local_rank, env.master_addr, master_ip,
        env.master_port, address, backend,
    )
    try:
        store = _tcp_store(master_ip, env.master_port, info, timeout_s if store_timeout_s is None else store_timeout_s)
        dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=dt.timedelta(seconds=timeout_s))
    except RendezvousError:
        raise
    except Exception as exc:  # torch raises RuntimeError/DistStoreError/DistNetworkError variants
        raise RendezvousError(
            f"rank {info.rank}: joining the process group at {master_ip}:{env.master_port} failed: {exc}"
        ) from exc
    return address


def join_epoch(env: RuntimeEnv, rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
               rendezvous_timeout_s: float = 120.0, timeout_s: float = 600.0) -> RankInfo:
    """Leave the current process group (if any) and join the one of a new membership epoch as
    ``rank`` of ``world_size`` (one process per pod), rendezvousing at ``master_addr:master_port``
    (hosted by the new rank 0), waiting at most ``rendezvous_timeout_s`` for the others. The
    live-resize path (docs/elastic.md): the process keeps its model and optimizer, only its group
    changes. Returns the new :class:`RankInfo`."""
    if env.nproc_per_worker != 1:
        raise RendezvousError("a live membership change needs one process per pod (LOCO_NPROC_PER_WORKER=1)")
    if not 0 <= rank < world_size:
        raise RendezvousError(f"membership update: rank {rank} outside 0..{world_size - 1}")
    if dist.is_initialized():
        dist.destroy_process_group()  # also every subgroup (the checkpoint engine's)
    info = RankInfo(rank=rank, local_rank=0, world_size=world_size, replica_index=rank, nproc_per_worker=1)
    new_env = env.model_copy(update={"master_addr": master_addr, "master_port": master_port,
                                     "replica_index": rank, "num_replicas": world_size})
    init_process_group(new_env, info, backend, timeout_s=timeout_s, resolve_timeout_s=rendezvous_timeout_s,
                       store_timeout_s=rendezvous_timeout_s)
    return info


def _tcp_store(master_ip: str, port: int, info: RankInfo, timeout_s: float) -> dist.TCPStore:
    """The job's TCP store. Rank 0 hosts it on ``master_ip`` only (not on every address, which is
    torch's default), so jobs whose masters share a host but not an IP -- pods of the embedded
    cluster, each with its own loopback IP -- can all use MASTER_PORT 29500."""
    timeout = dt.timedelta(seconds=timeout_s)
    if info.rank != 0:
        store = dist.TCPStore(master_ip, port, info.world_size, False, timeout=timeout)
        # Build the process group only once every rank has reached the store (rank 0 says so). A
        # rendezvous that can never complete -- a live epoch whose joiner died -- then stays in the
        # store, where a newer epoch's rendezvous in another thread can still proceed; a pending
        # process-group construction would block it (LiveMembership.join_newest).
        store.wait([ALL_JOINED_KEY], timeout)
        return store
    family = socket.AF_INET6 if ":" in master_ip else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((master_ip, port))
    except OSError as exc:
        listener.close()
        hint = "is another job's master on this address, or does MASTER_ADDR not name this pod?"
        ephemeral = ephemeral_port_range()
        if ephemeral and ephemeral[0] <= port <= ephemeral[1]:
            hint = (f"port {port} lies in this host's ephemeral range {ephemeral[0]}-{ephemeral[1]}, where the kernel "
                    f"hands ports to outgoing connections and to gloo's listeners: choose a MASTER_PORT below "
                    f"{ephemeral[0] - 1000} (a live job also uses the next 1,000 ports, one per membership epoch)")
        raise RendezvousError(
            f"rank 0 cannot listen on MASTER_ADDR {master_ip}:{port} ({exc.strerror}): {hint}"
        ) from exc
    listener.listen(max(128, info.world_size))
    # the store owns the descriptor from here on (detach: Python must not close it); the constructor
    # returns once all world_size ranks have connected
    store = dist.TCPStore(master_ip, port, info.world_size, True, timeout=timeout, master_listen_fd=listener.detach())
    store.set(ALL_JOINED_KEY, "1")
    return store


def ephemeral_port_range() -> tuple[int, int] | None:
    """The kernel's ephemeral port range (Linux), or None where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def pick_backend(device: torch.device) -> str:
    """gloo on CPU. On CUDA, NCCL for CUDA tensors and gloo for CPU ones: the loop's control
    all-reduces, the fault-detection probes and the clock estimate use small CPU tensors, which a
    NCCL-only group refuses."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
