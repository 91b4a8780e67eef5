"""Pod networking for the node agent: a network namespace per pod on a bridge, and Services.

What a CNI plugin, kube-proxy and cluster DNS do on a real node, done with iproute2, a
userspace proxy (kube-proxy's first mode) and hosts files:

- `PodNetwork` makes a Linux bridge holding the node's address (the pod CIDR's first) and, for
  each pod, a network namespace joined to it by a veth pair: the pod's eth0 gets the next free
  address and its default route goes through the node. Pods bind what ports they like (two
  replicas of one Deployment both listen on 8080) and are reached at their own address
  (probes, Prometheus, Services); the host's loopback-only services are out of their reach.
- The Service CIDR is a local route on the host's loopback, so every ClusterIP is an address
  this host answers on: `ServiceProxy` listens on each Service's ClusterIP:port and forwards
  each connection to a ready endpoint of the Service's EndpointSlices, round robin. An
  endpoint at the node's own address is this host: it is reached on 127.0.0.1, where the
  control plane and the host's test services listen (the API server's `kubernetes` endpoint,
  or a selectorless Service in front of a host's Prometheus).
- Names: `hosts_file` writes what cluster DNS would answer (`<svc>.<ns>.svc.cluster.local`,
  `<svc>.<ns>.svc`, `<svc>.<ns>`, and `<svc>` inside its own namespace) into each pod's
  /etc/hosts, which the agent bind-mounts over the host's.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN). Everything it creates carries a per-agent suffix
and is removed by `close`, and a leftover of a killed agent with the same suffix is removed
before it starts.
"""

import contextlib
import ipaddress
import itertools
import json
import logging
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("troughfill.nodeagent.net")

CLUSTER_DOMAIN = "cluster.local"
SYNC_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 5.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class PodSandbox:
    """A pod's network: its namespace (under /run/netns), host-side veth and address."""

    netns: str
    veth: str
    address: str

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"


class PodNetwork:
    """The node's bridge and pod addresses, and the local route for the Service CIDR."""

    def __init__(self, pod_cidr: str, service_cidr: str, suffix: str) -> None:
        self.pod_cidr = ipaddress.IPv4Network(pod_cidr)
        self.service_cidr = ipaddress.IPv4Network(service_cidr)
        self.suffix = suffix
        self.bridge = f"tfbr{suffix}"[:15]
        hosts = self.pod_cidr.hosts()
        self.node_address = str(next(hosts))
        self._free = [str(address) for address in hosts]
        self._pods: dict[str, PodSandbox] = {}
        self._lock = threading.Lock()

    def _netns_name(self, uid: str) -> str:
        return f"tf{self.suffix}-{uid[:13]}"

    def setup(self) -> None:
        self._remove_leftovers()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.node_address}/{self.pod_cidr.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        ip("addr", "add", str(self.service_cidr), "dev", "lo")

    def _remove_leftovers(self) -> None:
        ip("link", "del", self.bridge, check=False)
        ip("addr", "del", str(self.service_cidr), "dev", "lo", check=False)
        listed = ip("netns", "list", check=False).stdout.split()
        for name in listed:
            if name.startswith(f"tf{self.suffix}-"):
                ip("netns", "del", name, check=False)

    def add_pod(self, uid: str) -> PodSandbox:
        with self._lock:
            if uid in self._pods:
                return self._pods[uid]
            if not self._free:
                raise RuntimeError(f"no free address left in {self.pod_cidr}")
            address = self._free.pop(0)
            sandbox = PodSandbox(self._netns_name(uid), f"tfv{self.suffix}{uid[:8]}"[:15], address)
            self._pods[uid] = sandbox
        try:
            ip("netns", "add", sandbox.netns)
            ip("link", "add", sandbox.veth, "type", "veth", "peer", "name", "eth0", "netns", sandbox.netns)
            ip("link", "set", sandbox.veth, "master", self.bridge, "up")
            ip("-n", sandbox.netns, "addr", "add", f"{address}/{self.pod_cidr.prefixlen}", "dev", "eth0")
            ip("-n", sandbox.netns, "link", "set", "eth0", "up")
            ip("-n", sandbox.netns, "link", "set", "lo", "up")
            ip("-n", sandbox.netns, "route", "add", "default", "via", self.node_address)
        except BaseException:
            self.remove_pod(uid)
            raise
        return sandbox

    def remove_pod(self, uid: str) -> None:
        with self._lock:
            sandbox = self._pods.pop(uid, None)
        if sandbox is None:
            return
        ip("link", "del", sandbox.veth, check=False)
        ip("netns", "del", sandbox.netns, check=False)
        with self._lock:
            self._free.append(sandbox.address)

    def close(self) -> None:
        for uid in list(self._pods):
            self.remove_pod(uid)
        ip("link", "del", self.bridge, check=False)
        ip("addr", "del", str(self.service_cidr), "dev", "lo", check=False)


# --- Services -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    service: str
    cluster_ip: str
    port: int
    name: str


@dataclass
class Listener:
    port: ServicePort
    sock: socket.socket
    endpoints: list[tuple[str, int]] = field(default_factory=list)
    turn: "itertools.count[int]" = field(default_factory=itertools.count)


@dataclass(frozen=True)
class ServiceName:
    namespace: str
    name: str
    addresses: tuple[str, ...]
    """The ClusterIP, or a headless Service's ready endpoint addresses."""


def hosts_file(pod_namespace: str, pod_name: str, pod_address: str, services: Iterable[ServiceName]) -> str:
    """A pod's /etc/hosts: itself, localhost, and every Service's names as cluster DNS gives them."""
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_address}\t{pod_name}",
    ]
    for service in sorted(services, key=lambda s: (s.namespace, s.name)):
        names = [
            f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}",
            f"{service.name}.{service.namespace}.svc",
            f"{service.name}.{service.namespace}",
        ]
        if service.namespace == pod_namespace:
            names.append(service.name)
        lines += [f"{address}\t{' '.join(names)}" for address in service.addresses[:1]]
    return "\n".join(lines) + "\n"


def _endpoints(slices: list[dict[str, Any]], port: dict[str, Any]) -> list[tuple[str, int]]:
    """Ready (address, port) pairs of a Service port in its EndpointSlices."""
    found: list[tuple[str, int]] = []
    for item in slices:
        ports = item.get("ports") or []
        match = [p for p in ports if (p.get("name") or "") == (port.get("name") or "")] or (
            ports if len(ports) == 1 else []
        )
        if not match or match[0].get("port") is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            found += [(address, int(match[0]["port"])) for address in endpoint.get("addresses", [])[:1]]
    return sorted(set(found))


class ServiceProxy:
    """kube-proxy in userspace mode for TCP Services, and the names pods resolve them by."""

    def __init__(self, api: client.ApiClient, node_address: str) -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.node_address = node_address
        self.listeners: dict[tuple[str, int], Listener] = {}
        self.names: tuple[ServiceName, ...] = ()
        self.generation = 0
        """Bumped whenever `names` changes (the agent rewrites hosts files then)."""
        self.stopping = threading.Event()
        self.synced = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync()
                self.synced.set()
            except (ApiException, OSError, ValueError) as error:
                log.warning("service sync failed: %r", error)
            self.stopping.wait(SYNC_SECONDS)

    def sync(self) -> None:
        services = self.core.list_service_for_all_namespaces(_preload_content=False)
        slices = self.discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False)
        service_items = json.loads(services.data)["items"]
        by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for item in json.loads(slices.data)["items"]:
            owner = (item["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                by_service.setdefault((item["metadata"]["namespace"], owner), []).append(item)
        wanted: dict[tuple[str, int], tuple[ServicePort, list[tuple[str, int]]]] = {}
        names: list[ServiceName] = []
        for service in service_items:
            meta, spec = service["metadata"], service.get("spec", {})
            key = (meta["namespace"], meta["name"])
            cluster_ip = spec.get("clusterIP")
            if spec.get("type", "ClusterIP") == "ExternalName":
                continue
            service_slices = by_service.get(key, [])
            if not cluster_ip or cluster_ip == "None":
                ready = sorted({a for p in spec.get("ports", []) for a, _ in _endpoints(service_slices, p)})
                names.append(ServiceName(*key, tuple(ready)))
                continue
            names.append(ServiceName(*key, (cluster_ip,)))
            for port in spec.get("ports", []):
                if port.get("protocol", "TCP") != "TCP":
                    continue
                service_port = ServicePort(*key, cluster_ip, int(port["port"]), port.get("name") or "")
                wanted[(cluster_ip, int(port["port"]))] = (service_port, _endpoints(service_slices, port))
        for address in [a for a in self.listeners if a not in wanted]:
            self._close(self.listeners.pop(address))
        for address, (service_port, endpoints) in wanted.items():
            listener = self.listeners.get(address)
            if listener is None or listener.port != service_port:
                if listener is not None:
                    self._close(listener)
                    del self.listeners[address]
                try:
                    listener = self._listen(service_port)
                except OSError as error:  # one Service's port taken on this host: the others still work
                    log.warning(
                        "service %s/%s %s:%d not proxied: %r",
                        service_port.namespace,
                        service_port.service,
                        service_port.cluster_ip,
                        service_port.port,
                        error,
                    )
                    continue
                self.listeners[address] = listener
            listener.endpoints = [
                ("127.0.0.1" if address == self.node_address else address, port)
                for address, port in endpoints
            ]
        frozen = tuple(names)
        if frozen != self.names:
            self.names = frozen
            self.generation += 1

    def _listen(self, port: ServicePort) -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((port.cluster_ip, port.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        listener = Listener(port, sock)
        threading.Thread(
            target=self._accept, args=(listener,), name=f"svc {port.service}:{port.port}", daemon=True
        ).start()
        log.info("service %s/%s %s:%d proxied", port.namespace, port.service, port.cluster_ip, port.port)
        return listener

    @staticmethod
    def _close(listener: Listener) -> None:
        with contextlib.suppress(OSError):
            listener.sock.shutdown(socket.SHUT_RDWR)
        listener.sock.close()

    def _accept(self, listener: Listener) -> None:
        while not self.stopping.is_set():
            try:
                incoming, _ = listener.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(listener, incoming), daemon=True).start()

    def _forward(self, listener: Listener, incoming: socket.socket) -> None:
        endpoints = list(listener.endpoints)
        upstream = None
        for attempt in range(len(endpoints)):
            address = endpoints[(next(listener.turn) + attempt) % len(endpoints)]
            try:
                upstream = socket.create_connection(address, timeout=CONNECT_TIMEOUT_SECONDS)
                break
            except OSError:
                continue
        if upstream is None:  # no ready endpoint: the connection is refused, as kube-proxy does
            incoming.close()
            return
        upstream.settimeout(None)
        _pump(incoming, upstream)

    def close(self) -> None:
        self.stopping.set()
        for listener in self.listeners.values():
            self._close(listener)
        self.listeners.clear()


def _pump(left: socket.socket, right: socket.socket) -> None:
    """Copy bytes both ways until both sides have finished sending."""
    peers = {left: right, right: left}
    open_reads = {left, right}
    try:
        while open_reads:
            readable, _, _ = select.select(list(open_reads), [], [], 60)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    peers[sock].sendall(data)
                else:
                    open_reads.discard(sock)
                    with contextlib.suppress(OSError):
                        peers[sock].shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        left.close()
        right.close()


def wait_for_names(proxy: ServiceProxy, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not proxy.synced.is_set() and time.monotonic() < deadline:
        proxy.synced.wait(0.1)
