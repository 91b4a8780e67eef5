"""A real Kubernetes control plane on loopback, for tests and the demo (no containers needed).

etcd, kube-apiserver, kube-scheduler and kube-controller-manager (built from their Go modules
by scripts/setup_k8s.sh) on free 127.0.0.1 ports, with TLS serving certificates and client
certificates made by openssl, RBAC authorisation and service-account signing keys. Each
component has its own identity (system:kube-scheduler, system:kube-controller-manager); the
admin is in system:masters.

Pods need a node to run on: see devenv.nodeagent, which registers Node objects and runs bound
pods' commands as local processes.
"""

import base64
import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from troughfill_dev.localcluster.nodeagent import AGENT_LABEL
from troughfill_dev.localcluster.services import LOOPBACK, ManagedProcess, free_port, http_ok, wait_until

NETWORK_BLOCK = 198
"""Service and pod CIDRs come from 198.18.0.0/15 (reserved for benchmarking, RFC 2544): no
real network this host is on uses it. A control plane takes 198.18.<k>.0/24 for Services and
its node agent 198.19.<k>.0/24 for pods, k random, so two local clusters can run side by side."""
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc"
NODE_AGENT_USER = "troughfill:node-agent"
"""The node agent's identity (a client certificate), bound to what a kubelet may do."""
FRONT_PROXY_CLIENT = "front-proxy-client"
"""The API server's identity towards aggregated API servers (the aggregation layer)."""


def k8s_bin_dir() -> Path:
    """Where scripts/setup_k8s.sh left the binaries, etcd's included ($TROUGHFILL_K8S_BIN)."""
    found = os.environ.get("TROUGHFILL_K8S_BIN")
    if not found:
        raise FileNotFoundError("TROUGHFILL_K8S_BIN is not set: source scripts/setup_k8s.sh")
    return Path(found)


# --- certificates ---------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


class Pki:
    """A throwaway CA and the certificates and keys the control plane needs (EC P-256, fast)."""

    def __init__(self, directory: Path, service_ip: str) -> None:
        self.dir = directory
        self.service_ip = service_ip
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = Identity(self.dir / "ca.crt", self.dir / "ca.key")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=self.dir)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=troughfill-local-ca", cwd=self.dir,
        )  # fmt: skip
        # Service-account tokens are signed with RSA (RS256), which every client verifies.
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=self.dir)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.dir)
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"

    def issue(
        self,
        name: str,
        subject: str,
        *,
        server: bool = False,
        client: bool = False,
        sans: tuple[str, ...] = (),
    ) -> Identity:
        """A certificate signed by the CA: a client's, or a server's (with the API server's names
        and `sans`), or with `server` and `client` both, one that serves and dials (mutual TLS)."""
        key, csr, crt, ext = (self.dir / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=self.dir)
        _openssl("req", "-new", "-key", key.name, "-out", csr.name, "-subj", subject, cwd=self.dir)
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server:
            names = [
                "IP:127.0.0.1",
                f"IP:{self.service_ip}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                *sans,
            ]
            usage = "serverAuth,clientAuth" if client else "serverAuth"
            lines += [f"extendedKeyUsage={usage}", "subjectAltName=" + ",".join(names)]
        else:
            lines += ["extendedKeyUsage=clientAuth"]
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", crt.name, "-days", "3650", "-extfile", ext.name, cwd=self.dir,
        )  # fmt: skip
        return Identity(crt, key)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, identity: Identity, user: str) -> Path:
    """A kubeconfig with everything embedded (it can be copied elsewhere and still work)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "troughfill-local",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(identity.cert),
                    "client-key-data": _b64(identity.key),
                },
            }
        ],
        "contexts": [{"name": "troughfill-local", "context": {"cluster": "troughfill-local", "user": user}}],
        "current-context": "troughfill-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --- the control plane ------------------------------------------------------------------------


@dataclass
class ControlPlane:
    workdir: Path
    server: str
    kubeconfig: Path
    """The admin's (system:masters)."""
    node_agent_kubeconfig: Path
    """The node agent's own identity, with a kubelet's permissions."""
    ca: Path
    admin: Identity
    pki: Pki
    network_index: int
    """k of the Service CIDR 198.18.k.0/24 (and of a pod network's 198.19.k.0/24)."""
    processes: list[ManagedProcess] = field(default_factory=list)
    started_seconds: float = 0.0

    @property
    def service_cidr(self) -> str:
        return f"{NETWORK_BLOCK}.18.{self.network_index}.0/24"

    @property
    def pod_cidr(self) -> str:
        return f"{NETWORK_BLOCK}.19.{self.network_index}.0/24"

    @property
    def node_address(self) -> str:
        """The pod network's node address (its CIDR's first): this host, as pods see it."""
        return f"{NETWORK_BLOCK}.19.{self.network_index}.1"

    def stop(self) -> None:
        """Stop every process it started, newest first (the API server before etcd)."""
        for process in reversed(self.processes):
            process.stop(timeout=10)

    def running(self) -> bool:
        return all(p.running() for p in self.processes)

    def restart_apiserver(
        self, down_seconds: float = 0.0, *, kill: bool = True, timeout: float = 90.0
    ) -> float:
        """Kill (SIGKILL, or stop gracefully) kube-apiserver, wait `down_seconds`, start it again
        with the same arguments; returns once it is ready again: seconds it was away."""
        at = next(k for k, p in enumerate(self.processes) if p.name == "kube-apiserver")
        old = self.processes[at]
        gone = time.monotonic()
        if kill:
            old.kill()
        else:
            old.stop(timeout=10)
        time.sleep(down_seconds)
        fresh = ManagedProcess(old.name, old.args, old.workdir, env=old.env, cpus=old.cpus)
        self.processes[at] = fresh
        _wait_healthy(fresh, f"{self.server}/readyz", timeout, self.ssl_context())
        return time.monotonic() - gone

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def _send(
        self, method: str, path: str, body: bytes | None, timeout: float, attempts: int
    ) -> tuple[int, str]:
        """One admin request, sent again when it times out or loses its connection (up to
        `attempts` tries): on a busy two-core machine the API server can be slow to answer
        while other control planes start. Only idempotent uses call this (a GET, a DELETE
        where 404 counts as done, a create where 409 does). (status, body) of the answer."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(
                f"{self.server}{path}", data=body, headers=headers, method=method
            )
            try:
                with urllib.request.urlopen(request, context=self.ssl_context(), timeout=timeout) as reply:
                    return int(reply.status), reply.read().decode()
            except urllib.error.HTTPError as error:
                return int(error.code), error.read().decode(errors="replace")
            except (TimeoutError, ConnectionError, urllib.error.URLError) as error:
                if attempt == attempts:
                    raise RuntimeError(
                        f"{method} {path}: no answer in {attempts} tries: {error!r}"
                    ) from error
                time.sleep(1)
        raise AssertionError("unreachable")

    def get(self, path: str, timeout: float = 5, attempts: int = 1) -> tuple[int, str]:
        """An admin GET to the API server: (status, body). One try unless asked for more
        (callers that poll ask again themselves)."""
        return self._send("GET", path, None, timeout, attempts)

    def delete(self, path: str) -> int:
        """An admin DELETE: the status (404, already gone, counts as done)."""
        return self._send("DELETE", path, None, 30, 3)[0]

    def wait_established(self, names: list[str] | None = None, timeout: float = 60) -> None:
        """Until the named CRDs (None: every CRD) are Established. `kubectl wait
        --for=condition=Established` fails at once, instead of waiting, when it reads a CRD
        the API server has not yet given conditions (`.status.conditions accessor error: <nil>`)."""

        def established() -> bool:
            status, body = self.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", 15, 3)
            if status != 200:
                return False
            items = {item["metadata"]["name"]: item for item in json.loads(body)["items"]}
            wanted = names if names is not None else list(items)
            for name in wanted:
                conditions = ((items.get(name) or {}).get("status") or {}).get("conditions") or []
                if not any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                    return False
            return True

        wait_until(established, timeout, f"CRDs {', '.join(names or ['(all)'])} established", interval=0.2)

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """kubectl as the admin: its stdout (RuntimeError with its stderr when it fails)."""
        done = subprocess.run(
            [str(k8s_bin_dir() / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def apply_json(self, path: str, body: dict[str, object]) -> int:
        """An admin POST (create); 409 (already there) counts as done. A create that times
        out is sent again: one that did land answers the retry with 409."""
        status, text = self._send("POST", path, json.dumps(body).encode(), 30, 3)
        if status >= 300 and status != 409:
            raise RuntimeError(f"POST {path}: {status} {text}")
        return status


def _wait_healthy(
    process: ManagedProcess, url: str, timeout: float, context: ssl.SSLContext | None = None
) -> None:
    """Until `url` answers 200; at once an error if the process dies first."""

    def ready() -> bool:
        process.check_alive()
        return http_ok(url, context, timeout=2)

    wait_until(ready, timeout, process.name)


def _find(name: str, bin_dir: Path) -> str:
    path = bin_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run scripts/setup_k8s.sh")
    return str(path)


def start_control_plane(workdir: Path, bin_dir: Path | None = None, timeout: float = 90) -> ControlPlane:
    """etcd + kube-apiserver + kube-scheduler + kube-controller-manager, ready to use.

    Ready means: the API server answers /readyz, the scheduler and the controller manager
    answer /healthz, and the controller manager has created the default namespace's service
    account (its controllers are working).
    """
    started = time.monotonic()
    bin_dir = bin_dir or k8s_bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    network_index = secrets.randbelow(256)
    # The `kubernetes` Service's ClusterIP (the range's first address): pods reach the API there.
    pki = Pki(workdir / "pki", f"{NETWORK_BLOCK}.18.{network_index}.1")
    apiserver_cert = pki.issue("apiserver", "/CN=kube-apiserver", server=True)
    admin = pki.issue("admin", "/O=system:masters/CN=troughfill-admin")
    scheduler = pki.issue("scheduler", "/CN=system:kube-scheduler")
    controller_manager = pki.issue("controller-manager", "/CN=system:kube-controller-manager")
    node_agent = pki.issue("node-agent", f"/CN={NODE_AGENT_USER}")
    # The aggregation layer: the API server proxies an APIService's group (KEDA's external
    # metrics, say) to its server as this client, naming the user in request headers.
    front_proxy = pki.issue("front-proxy-client", f"/CN={FRONT_PROXY_CLIENT}")

    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    scheduler_port, cm_port = free_port(), free_port()
    server = f"https://{LOOPBACK}:{api_port}"
    kubeconfigs = workdir / "kubeconfig"
    kubeconfigs.mkdir(exist_ok=True)
    admin_kc = write_kubeconfig(kubeconfigs / "admin.yaml", server, pki.ca.cert, admin, "admin")
    scheduler_kc = write_kubeconfig(
        kubeconfigs / "scheduler.yaml", server, pki.ca.cert, scheduler, "scheduler"
    )
    cm_kc = write_kubeconfig(
        kubeconfigs / "controller-manager.yaml", server, pki.ca.cert, controller_manager, "controller-manager"
    )
    agent_kc = write_kubeconfig(
        kubeconfigs / "node-agent.yaml", server, pki.ca.cert, node_agent, "node-agent"
    )
    plane = ControlPlane(workdir, server, admin_kc, agent_kc, pki.ca.cert, admin, pki, network_index)

    try:
        etcd = ManagedProcess(
            "etcd",
            [
                _find("etcd", bin_dir), "--name", "troughfill", "--data-dir", str(workdir / "etcd-data"),
                "--listen-client-urls", f"http://{LOOPBACK}:{etcd_port}",
                "--advertise-client-urls", f"http://{LOOPBACK}:{etcd_port}",
                "--listen-peer-urls", f"http://{LOOPBACK}:{etcd_peer}",
                "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{etcd_peer}",
                "--initial-cluster", f"troughfill=http://{LOOPBACK}:{etcd_peer}",
                "--listen-metrics-urls", "",
            ],
            workdir / "etcd",
        )  # fmt: skip
        plane.processes.append(etcd)
        _wait_healthy(etcd, f"http://{LOOPBACK}:{etcd_port}/health", timeout)

        apiserver = ManagedProcess(
            "kube-apiserver",
            [
                _find("kube-apiserver", bin_dir),
                f"--etcd-servers=http://{LOOPBACK}:{etcd_port}",
                # The `kubernetes` Service's endpoint must not be loopback: the node address of
                # a pod network stands for this host (devenv.podnet reaches it on loopback).
                f"--bind-address={LOOPBACK}", f"--advertise-address={plane.node_address}",
                f"--secure-port={api_port}",
                f"--tls-cert-file={apiserver_cert.cert}", f"--tls-private-key-file={apiserver_cert.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--requestheader-client-ca-file={pki.ca.cert}",
                f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}", f"--proxy-client-key-file={front_proxy.key}",
                # To an APIService's endpoint, not its ClusterIP: without a pod network there
                # is no Service proxy on this host.
                "--enable-aggregator-routing=true",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={plane.service_cidr}",
                "--allow-privileged=true",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                "--profiling=false",
                "--v=1",
            ],
            workdir / "kube-apiserver",
        )  # fmt: skip
        plane.processes.append(apiserver)
        context = plane.ssl_context()
        _wait_healthy(apiserver, f"{server}/readyz", timeout, context)
        _grant_node_agent(plane)

        sched = ManagedProcess(
            "kube-scheduler",
            [
                _find("kube-scheduler", bin_dir),
                f"--kubeconfig={scheduler_kc}",
                f"--authentication-kubeconfig={scheduler_kc}", f"--authorization-kubeconfig={scheduler_kc}",
                f"--bind-address={LOOPBACK}", f"--secure-port={scheduler_port}",
                f"--cert-dir={workdir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
            workdir / "kube-scheduler",
        )  # fmt: skip
        plane.processes.append(sched)
        cm = ManagedProcess(
            "kube-controller-manager",
            [
                _find("kube-controller-manager", bin_dir),
                f"--kubeconfig={cm_kc}",
                f"--authentication-kubeconfig={cm_kc}", f"--authorization-kubeconfig={cm_kc}",
                f"--bind-address={LOOPBACK}", f"--secure-port={cm_port}",
                f"--cert-dir={workdir / 'controller-manager-certs'}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca.cert}",
                "--use-service-account-credentials=true",
                # Notice a node agent that stopped heartbeating within seconds, not minutes.
                "--node-monitor-period=1s",
                "--v=1",
            ],
            workdir / "kube-controller-manager",
        )  # fmt: skip
        plane.processes.append(cm)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # their self-signed serving certs; only /healthz is read
        _wait_healthy(sched, f"https://{LOOPBACK}:{scheduler_port}/healthz", timeout, insecure)
        _wait_healthy(cm, f"https://{LOOPBACK}:{cm_port}/healthz", timeout, insecure)
        wait_until(
            lambda: plane.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            timeout,
            "the default service account (controllers working)",
            interval=0.2,
        )
    except BaseException:
        plane.stop()
        raise
    plane.started_seconds = time.monotonic() - started
    return plane


def _grant_node_agent(plane: ControlPlane) -> None:
    """What the node agent does, as RBAC: register nodes, run pods, report their status."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    plane.apply_json(
        f"{rbac}/clusterroles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "troughfill:node-agent"},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes", "nodes/status"], "verbs": ["*"]},
                {
                    "apiGroups": [""],
                    "resources": ["pods"],
                    "verbs": ["get", "list", "watch", "delete", "patch"],
                },
                {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch", "update"]},
                {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get"]},
                # Projected service-account tokens, bound to the pod (the TokenRequest API).
                {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
                # Volumes: claims it mounts, and hostPath volumes it provisions for them.
                {
                    "apiGroups": [""],
                    "resources": ["persistentvolumeclaims"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["persistentvolumes"],
                    "verbs": ["get", "list", "watch", "create", "delete"],
                },
                {
                    "apiGroups": ["storage.k8s.io"],
                    "resources": ["storageclasses"],
                    "verbs": ["get", "list", "create"],
                },
                # What kube-proxy reads: Services and their endpoints.
                {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                },
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
            ],
        },
    )
    plane.apply_json(
        f"{rbac}/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "troughfill:node-agent"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "troughfill:node-agent",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NODE_AGENT_USER}],
        },
    )


# --- nodes --------------------------------------------------------------------------------------


def _ready_agent_nodes(plane: ControlPlane, count: int) -> bool:
    """At least `count` agent nodes Ready and no longer tainted not-ready."""
    status, body = plane.get(f"/api/v1/nodes?labelSelector={AGENT_LABEL}%3Dtrue")
    if status != 200:
        return False
    ready = 0
    for node in json.loads(body).get("items", []):
        conditions = node.get("status", {}).get("conditions", [])
        taints = node.get("spec", {}).get("taints", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) and not any(
            t["key"] == "node.kubernetes.io/not-ready" for t in taints
        ):
            ready += 1
    return ready >= count


def start_node_agent(
    plane: ControlPlane,
    workdir: Path,
    *,
    nodes: int,
    gpus: int,
    python: str | None = None,
    timeout: float = 60,
    pod_network: bool = False,
    images: Path | None = None,
    gpu_product: str | None = None,
    storage_class: str | None = None,
) -> ManagedProcess:
    """The node agent (devenv.nodeagent): `nodes` nodes of `gpus` GPUs each, returned once Ready.

    `pod_network`: every pod gets a network namespace and an address in the plane's pod CIDR,
    and Services work (needs root); `images`: a JSON file of the local images pods may run;
    `storage_class`: the default StorageClass, whose claims the agent provisions."""
    args = [
        python or os.environ.get("PYTHON", "python"), "-m", "troughfill_dev.localcluster.nodeagent",
        "--kubeconfig", str(plane.node_agent_kubeconfig), "--workdir", str(workdir / "pods"),
        "--nodes", str(nodes), "--gpus", str(gpus),
    ]  # fmt: skip
    if pod_network:
        args += [
            "--pod-cidr", plane.pod_cidr, "--service-cidr", plane.service_cidr,
            "--network-suffix", str(plane.network_index),
        ]  # fmt: skip
    if images is not None:
        args += ["--images", str(images)]
    if gpu_product:
        args += ["--gpu-product", gpu_product]
    if storage_class:
        args += ["--storage-class", storage_class]
    agent = ManagedProcess("node-agent", args, workdir / "agent")

    def ready() -> bool:
        agent.check_alive()
        return _ready_agent_nodes(plane, nodes)

    try:
        wait_until(ready, timeout, f"{nodes} nodes Ready", interval=0.2)
    except BaseException:
        agent.stop(timeout=15)
        raise
    return agent
