"""Test and demo infrastructure, not part of the operator: a node agent that runs pods as processes.

There is no container runtime here, so this stands in for the kubelet on a local control
plane (devenv.cluster):

- registers Node objects with a number of GPUs as an extended resource (`nvidia.com/gpu: 8`,
  say), Ready, and keeps their Ready heartbeat fresh;
- for each pod bound to one of its nodes, runs each container's `command` + `args` as a local
  process (the image is ignored: the command must exist on this machine), with the container's
  `env` (literal values, fieldRef, configMap/secret keys, envFrom), in a scratch directory per
  pod, output to `<workdir>/<namespace>_<pod>/<container>.log`; reports Running, Succeeded or
  Failed with container statuses, restarts containers per the pod's restartPolicy (back-off
  1 s doubling to 30 s, CrashLoopBackOff while waiting), runs exec and httpGet readiness and
  liveness probes;
- on pod deletion (a graceful delete sets deletionTimestamp) sends SIGTERM to the pod's process
  groups, waits the pod's grace period, SIGKILLs what is left, then removes the pod object,
  as the kubelet does. The scheduler's priority preemption therefore really evicts pods.

With a pod network (`--pod-cidr`, devenv.podnet), each pod gets a network namespace and an
address of its own, Services work by ClusterIP and by name (a userspace kube-proxy and each
pod's /etc/hosts), and probes reach the pod's address; without one, pods share the host's
network (as with hostNetwork) and see 127.0.0.1 as their address. Volumes (emptyDir,
hostPath, PVCs, configMap, secret, downwardAPI, projected, the service-account token from the
TokenRequest API included) are bind-mounted into each container's own mount namespace
(devenv.podfs); with `--storage-class` the agent also provisions PVCs of that class as
hostPath volumes in its workdir. With `--images`, images are local (devenv.podfs.LocalImage):
only those run, the rest wait in ErrImagePull.

Not supported (the pod is marked Failed with a reason saying so): init containers and volume
types other than those above. Resource limits and security contexts are not enforced.
`kubectl logs` and `exec` need a kubelet API and do not work; read the log files instead.

Run it as `python -m troughfill_dev.localcluster.nodeagent --kubeconfig K --nodes 2 --gpus 8 --workdir D`.
"""

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from troughfill_dev.localcluster.podfs import (
    LocalImage,
    PodVolumes,
    VolumeError,
    VolumeMaker,
    VolumeNotReadyError,
    exec_in,
    load_images,
    mounts_for,
    wrap,
)
from troughfill_dev.localcluster.podnet import (
    CLUSTER_DOMAIN,
    PodNetwork,
    PodSandbox,
    ServiceProxy,
    hosts_file,
    wait_for_names,
)

log = logging.getLogger("troughfill.nodeagent")

GPU_RESOURCE = "nvidia.com/gpu"
AGENT_LABEL = "troughfill.dev/node-agent"
PID_ANNOTATION = "troughfill.dev/node-agent-pids"
CONTAINER_TAG = "TROUGHFILL_NODE_AGENT_CONTAINER"
"""Set in every container's environment (pod uid/container name); what a container spawns
inherits it, so its leftovers can be found and killed when it ends, as a container runtime
does (a process that left its process group, like the worker's engine, included)."""
"""Set on each running pod: {container: pid} of its local processes (tests look at them)."""
LOCAL_PROVISIONER = "troughfill.dev/node-agent-hostpath"
HEARTBEAT_SECONDS = 5.0
CONFIG_RETRY_SECONDS = 2.0
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
MOUNT_RETRY_SECONDS, MOUNT_RETRY_INTERVAL = 120.0, 0.5
"""How long a pod waits for what its volumes name, and how often it looks again."""
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
"""Host variables a container also gets (its command runs here, it needs a PATH)."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    backoff_until: float = 0.0
    ready: bool = False
    probe_due: float = 0.0
    liveness_due: float = 0.0
    started: bool = True
    """False until its startupProbe, if any, has passed (liveness and readiness wait for it)."""
    startup_due: float = 0.0
    startup_failures: int = 0
    liveness_failures: int = 0
    readiness_failures: int = 0
    readiness_successes: int = 0
    waiting: dict[str, str] | None = None
    """Why it cannot start (an image this node does not have, a Secret not there yet)."""
    retry_at: float = 0.0
    """When to try starting it again while it waits (0: never)."""
    isolated: bool = False
    environment: dict[str, str] | None = None
    """The environment it was started with: exec probes run with it, as they run inside the
    container on a real node (not resolved again: a probe every few seconds re-reading each
    Secret key it names kept a busy agent's probes late)."""
    """Runs in namespaces of its own (exec probes enter them)."""


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    node: str
    spec: dict[str, Any]
    metadata: dict[str, Any]
    directory: Path
    containers: list[Container] = field(default_factory=list)
    started_at: str = field(default_factory=now)
    terminating: bool = False
    finished: bool = False
    reported: str = ""
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Condition type -> (its status, when it took that status), as a kubelet keeps them."""
    sandbox: PodSandbox | None = None
    volumes: PodVolumes = field(default_factory=PodVolumes)
    names: Path | None = None
    """With a pod network: the directory holding its hosts and resolv.conf."""
    hosts_generation: int = -1
    pod: dict[str, Any] = field(default_factory=dict)
    """The pod as first seen (its volumes are made from it)."""
    mount_waiting: str | None = None
    """Why its volumes could not be made yet (a ConfigMap, Secret or claim not there yet)."""
    mount_deadline: float = 0.0
    next_mount: float = 0.0

    @property
    def address(self) -> str:
        return self.sandbox.address if self.sandbox else "127.0.0.1"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class ContainerConfigError(RuntimeError):
    """What a container's environment names is not there (CreateContainerConfigError)."""


class NodeAgent:
    def __init__(
        self,
        api: client.ApiClient,
        workdir: Path,
        node_names: list[str],
        gpus: int,
        *,
        cpu: str = "64",
        memory: str = "256Gi",
        gpu_product: str = "local-process-gpu",
        images: dict[str, LocalImage] | None = None,
        network: PodNetwork | None = None,
        storage_class: str | None = None,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.node_names = node_names
        self.gpus = gpus
        self.cpu, self.memory, self.gpu_product = cpu, memory, gpu_product
        self.images = images
        self.network = network
        self.proxy = ServiceProxy(api, network.node_address) if network else None
        self.storage_class = storage_class
        self.volume_maker = VolumeMaker(self.core)
        self.node_address = network.node_address if network else "127.0.0.1"
        self.pods: dict[str, LocalPod] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()

    # --- nodes ---------------------------------------------------------------------------

    def register_nodes(self) -> None:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110", GPU_RESOURCE: str(self.gpus)}
        version = client.VersionApi(self.api).get_code().git_version
        for name in self.node_names:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        AGENT_LABEL: "true",
                        "nvidia.com/gpu.product": self.gpu_product,
                    },
                },
            }
            with contextlib.suppress(ApiException):
                self.core.create_node(body)
            self.core.patch_node_status(
                name,
                {
                    "status": {
                        "capacity": capacity,
                        "allocatable": capacity,
                        "addresses": [
                            {"type": "InternalIP", "address": self.node_address},
                            {"type": "Hostname", "address": name},
                        ],
                        "nodeInfo": {
                            "kubeletVersion": f"{version}-troughfill-node-agent",
                            "kubeProxyVersion": "",
                            "operatingSystem": "linux",
                            "architecture": "amd64",
                            "containerRuntimeVersion": "local-process://0",
                            "machineID": name,
                            "systemUUID": name,
                            "bootID": name,
                            "kernelVersion": os.uname().release,
                            "osImage": "local processes",
                        },
                        "conditions": self._node_conditions(),
                    }
                },
            )

    def _node_conditions(self) -> list[dict[str, str]]:
        stamp = now()
        healthy = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return [
            {"type": t, "status": s, "reason": r, "message": "troughfill node agent",
             "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
            for t, s, r in healthy
        ]  # fmt: skip

    def _heartbeat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            for name in self.node_names:
                try:
                    self.core.patch_node_status(name, {"status": {"conditions": self._node_conditions()}})
                except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                    log.warning("heartbeat for %s failed: %r", name, error)

    # --- pods ----------------------------------------------------------------------------

    def run(self) -> None:
        self.register_nodes()
        threads = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self._supervise, name="supervise", daemon=True),
        ]
        if self.proxy is not None:
            threads.append(threading.Thread(target=self.proxy.run, name="service-proxy", daemon=True))
        if self.storage_class:
            self._ensure_storage_class()
            threads.append(threading.Thread(target=self._provision, name="provisioner", daemon=True))
        for thread in threads:
            thread.start()
        if self.proxy is not None:
            wait_for_names(self.proxy)  # pods' /etc/hosts name every Service from the start
        try:
            self._watch_pods()
        finally:
            self.stopping.set()
            self.stop_all()

    def _watch_pods(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(_preload_content=False)
                data = json.loads(listing.data)
                seen = set()
                for item in data["items"]:
                    seen.add(f"{item['metadata']['namespace']}/{item['metadata']['name']}")
                    self._observe(item)
                with self.lock:
                    for key in [k for k in self.pods if k not in seen]:
                        self._gone(self.pods[key])
                version = data["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=version,
                    timeout_seconds=60,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    pod = event["raw_object"]
                    if event["type"] == "DELETED":
                        with self.lock:
                            local = self.pods.get(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}")
                            if local and local.uid == pod["metadata"]["uid"]:
                                self._gone(local)
                    elif event["type"] in {"ADDED", "MODIFIED"}:
                        self._observe(pod)
            except (
                ApiException,
                urllib.error.URLError,
                urllib3.exceptions.HTTPError,
                OSError,
                ValueError,
            ) as error:
                # A busy API server can cut a list or a watch short (IncompleteRead): relist.
                if self.stopping.is_set():
                    return
                log.warning("pod watch failed (%r); relisting", error)
                time.sleep(0.5)

    def _observe(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        if spec.get("nodeName") not in self.node_names:
            return
        key = f"{meta['namespace']}/{meta['name']}"
        with self.lock:
            local = self.pods.get(key)
            if local is not None and local.uid != meta["uid"]:
                self._gone(local)  # a new pod of the same name
                local = None
            if local is None:
                phase = pod.get("status", {}).get("phase")
                if phase in {"Succeeded", "Failed"}:
                    if meta.get("deletionTimestamp"):
                        self._remove(meta["namespace"], meta["name"], meta["uid"])
                    return
                local = self._start_pod(pod)
                if local is None:
                    return
            if meta.get("deletionTimestamp") and not local.terminating:
                local.terminating = True
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = spec.get("terminationGracePeriodSeconds", 30)
                threading.Thread(
                    target=self._terminate, args=(local, float(grace)), name=f"stop {key}", daemon=True
                ).start()

    def _start_pod(self, pod: dict[str, Any]) -> LocalPod | None:
        meta, spec = pod["metadata"], pod["spec"]
        directory = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        local = LocalPod(
            namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], node=spec["nodeName"],
            spec=spec, metadata=meta, directory=directory,
            containers=[Container(c["name"], c) for c in spec.get("containers", [])],
        )  # fmt: skip
        self.pods[local.key] = local
        if spec.get("initContainers"):
            self._fail(local, "Unsupported", "the node agent does not run init containers")
            return local
        try:
            if self.network is not None and not spec.get("hostNetwork"):
                local.sandbox = self.network.add_pod(local.uid)
                local.names = directory / "etc"
                local.names.mkdir(exist_ok=True)
                # No DNS server: names are in /etc/hosts; any other lookup fails at once
                # (nothing answers on the pod's own loopback) instead of timing out.
                (local.names / "resolv.conf").write_text(
                    f"search {local.namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
                    "nameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n"
                )
                self._write_hosts(local)
        except (ApiException, RuntimeError, OSError) as error:
            self._fail(local, "FailedCreatePodSandBox", str(error)[:500])
            return local
        local.pod = pod
        local.mount_deadline = time.monotonic() + MOUNT_RETRY_SECONDS
        self._mount_and_start(local)
        return local

    def _mount_and_start(self, local: LocalPod) -> None:
        """Make the pod's volumes, then start its containers. What a volume names may not exist
        yet (a new namespace's kube-root-ca.crt ConfigMap comes seconds after the namespace):
        like the kubelet, retry (the pod stays Pending) until MOUNT_RETRY_SECONDS have passed."""
        try:
            local.volumes = self.volume_maker.materialise(local.pod, local.directory)
        except VolumeNotReadyError as error:
            if time.monotonic() < local.mount_deadline:
                if local.mount_waiting is None:
                    log.info("pod %s waits for its volumes: %s", local.key, str(error)[:200])
                local.mount_waiting = str(error)[:500]
                local.next_mount = time.monotonic() + MOUNT_RETRY_INTERVAL
                return
            self._fail(local, "FailedMount", str(error)[:500])
            return
        except (VolumeError, ApiException, RuntimeError, OSError) as error:
            self._fail(local, "FailedMount", str(error)[:500])
            return
        local.mount_waiting = None
        for container in local.containers:
            self._start_container(local, container)
        self._report(local)
        log.info("started pod %s on %s", local.key, local.node)

    def _fail(self, local: LocalPod, reason: str, message: str) -> None:
        local.finished = True
        self._release(local)
        log.warning("pod %s failed: %s: %s", local.key, reason, message)
        self._patch_status(local, {"phase": "Failed", "reason": reason, "message": message})

    def _write_hosts(self, local: LocalPod) -> None:
        """The pod's /etc/hosts: rewritten in place when Services change (the bind mount
        follows the file, not a name)."""
        if local.names is None or self.proxy is None:
            return
        generation = self.proxy.generation
        hosts = hosts_file(local.namespace, local.name, local.address, self.proxy.names)
        (local.names / "hosts").write_text(hosts)
        local.hosts_generation = generation

    def _image(self, container: Container) -> LocalImage | None:
        return self.images.get(container.spec.get("image", "")) if self.images is not None else None

    def _environment(self, local: LocalPod, spec: dict[str, Any]) -> dict[str, str]:
        if self.images is None:
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        else:  # the image's own environment, nothing of this host's
            image = self.images.get(spec.get("image", ""), LocalImage())
            env = {"HOME": str(local.directory / "home"), **image.environment()}
        env.update({"HOSTNAME": local.name, "KUBERNETES_NODE_NAME": local.node})
        if self.proxy is not None and local.sandbox is not None:
            # What the kubelet gives every pod: where the API server is (Python's in-cluster
            # loader and client-go read these, with the projected token).
            kubernetes = next(
                (s for s in self.proxy.names if (s.namespace, s.name) == ("default", "kubernetes")), None
            )
            if kubernetes and kubernetes.addresses:
                env.update(KUBERNETES_SERVICE_HOST=kubernetes.addresses[0], KUBERNETES_SERVICE_PORT="443")
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            kind = "configMap" if "configMapRef" in source else "secret"
            ref = source[f"{kind}Ref"]
            data = self._source_data(kind, local.namespace, ref["name"], optional=bool(ref.get("optional")))
            env.update({prefix + k: v for k, v in (data or {}).items()})
        for item in spec.get("env", []):
            if "value" in item:
                env[item["name"]] = _expand(str(item["value"]), env)
            elif "valueFrom" in item:
                value = self._value_from(local, item["valueFrom"])
                if value is not None:  # an optional reference to what is not there: unset
                    env[item["name"]] = value
        return env

    def _value_from(self, local: LocalPod, source: dict[str, Any]) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": local.name,
                "metadata.namespace": local.namespace,
                "metadata.uid": local.uid,
                "spec.nodeName": local.node,
                "spec.serviceAccountName": local.spec.get("serviceAccountName", "default"),
                "status.podIP": local.address,
                "status.hostIP": self.node_address,
            }
            if path in fields:
                return str(fields[path])
            for prefix, mapping in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
                if path.startswith(prefix + "['"):
                    return str(local.metadata.get(mapping, {}).get(path[len(prefix) + 2 : -2], ""))
            return ""
        for kind in ("configMap", "secret"):
            if f"{kind}KeyRef" in source:
                ref = source[f"{kind}KeyRef"]
                optional = bool(ref.get("optional"))
                data = self._source_data(kind, local.namespace, ref["name"], optional=optional)
                if data is None or (ref["key"] not in data and optional):
                    return None
                if ref["key"] not in data:
                    raise ContainerConfigError(f"key {ref['key']} not in {kind} {ref['name']}")
                return data[ref["key"]]
        return ""

    def _source_data(self, kind: str, namespace: str, name: str, *, optional: bool) -> dict[str, str] | None:
        """A ConfigMap's (`kind` "configMap") or Secret's data; None when it is not there and
        `optional`, ContainerConfigError when it is not there and required."""
        read = (
            self.core.read_namespaced_config_map if kind == "configMap" else self.core.read_namespaced_secret
        )
        try:
            data = read(name, namespace).data or {}
        except ApiException as error:
            if error.status != 404:
                raise
            if optional:
                return None
            raise ContainerConfigError(f"{kind} {name} not found") from error
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def _start_container(self, local: LocalPod, container: Container) -> None:
        spec = container.spec
        argv = [*spec.get("command", []), *spec.get("args", [])]
        image = self._image(container)
        if self.images is not None and image is None:
            container.waiting = {
                "reason": "ErrImagePull",
                "message": f"image {spec.get('image')!r} is not one of this node's local images",
            }
            return
        try:
            env = self._environment(local, spec)
        except ContainerConfigError as error:
            # As the kubelet: the container waits and is tried again (the object may come).
            container.waiting = {"reason": "CreateContainerConfigError", "message": str(error)}
            container.retry_at = time.monotonic() + CONFIG_RETRY_SECONDS
            return
        container.waiting = None
        container.environment = env
        try:
            argv = [_expand(a, env) for a in argv]
            if not argv:
                raise ValueError("no command: the node agent cannot run an image's entrypoint")
            cwd = spec.get("workingDir")
            if not cwd or not Path(cwd).is_dir():
                cwd = str(local.directory)
            (local.directory / "home").mkdir(exist_ok=True)
            env[CONTAINER_TAG] = _tag(local, container)
            mounts = mounts_for(spec, local.volumes, image, local.names)
            netns = local.sandbox.netns_path if local.sandbox else None
            container.isolated = bool(mounts or netns)
            with (local.directory / f"{container.name}.log").open("ab") as output:
                container.process = subprocess.Popen(
                    wrap(argv, mounts, netns), cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        except (OSError, ValueError, ApiException, VolumeError) as error:
            log.warning("pod %s container %s did not start: %s", local.key, container.name, error)
            container.process = None
            container.terminated = {
                "exitCode": 128, "reason": "StartError", "message": str(error)[:500],
                "startedAt": now(), "finishedAt": now(),
            }  # fmt: skip
            return
        container.started_at = now()
        container.terminated = None
        container.ready = not spec.get("readinessProbe")
        probe = spec.get("readinessProbe") or {}
        container.probe_due = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        liveness = spec.get("livenessProbe") or {}
        container.liveness_due = time.monotonic() + float(liveness.get("initialDelaySeconds", 0))
        container.liveness_failures = container.readiness_failures = container.readiness_successes = 0
        startup = spec.get("startupProbe") or {}
        container.started = not startup
        container.startup_due = time.monotonic() + float(startup.get("initialDelaySeconds", 0))
        container.startup_failures = 0

    # --- supervision ---------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self.stopping.wait(0.1):
            with self.lock:
                pods = [p for p in self.pods.values() if not p.finished and not p.terminating]
            for local in pods:
                try:
                    if local.mount_waiting is not None:
                        if time.monotonic() >= local.next_mount:
                            self._mount_and_start(local)
                        continue
                    if self.proxy is not None and local.hosts_generation != self.proxy.generation:
                        self._write_hosts(local)
                    self.volume_maker.refresh(local.volumes)
                    self._check(local)
                except ApiException as error:
                    if error.status != 404:
                        log.warning("status of %s: %s", local.key, error.reason)
                except Exception:  # one pod's trouble must not stop the agent
                    log.exception("supervising %s", local.key)

    def _check(self, local: LocalPod) -> None:
        policy = local.spec.get("restartPolicy", "Always")
        for container in local.containers:
            process = container.process
            if process is not None and process.poll() is not None:
                code = process.returncode
                _kill_remains(_tag(local, container))  # the container is gone: all of it
                container.process = None
                container.ready = False
                container.terminated = {
                    "exitCode": code if code >= 0 else 128 - code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": container.started_at, "finishedAt": now(),
                }  # fmt: skip
                if code < 0:
                    container.terminated["signal"] = -code
                restart = policy == "Always" or (policy == "OnFailure" and code != 0)
                if restart:
                    delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** min(container.restarts, 8))
                    container.backoff_until = time.monotonic() + delay
                    log.info(
                        "pod %s container %s exited %s; restart in %.0fs",
                        local.key,
                        container.name,
                        code,
                        delay,
                    )
            elif process is None and container.waiting and container.retry_at:
                if time.monotonic() >= container.retry_at:
                    container.retry_at = 0.0
                    self._start_container(local, container)
            elif process is None and container.terminated and container.backoff_until:
                if time.monotonic() >= container.backoff_until:
                    container.backoff_until = 0.0
                    container.last_terminated = container.terminated
                    container.restarts += 1
                    self._start_container(local, container)
            elif process is not None:
                self._probe(local, container)
        if all(c.process is None and c.terminated and not c.backoff_until for c in local.containers):
            local.finished = True
            self._release(local)  # as the kubelet: a finished pod's sandbox goes, its object stays
        self._report(local)

    def _probe(self, local: LocalPod, container: Container) -> None:
        readiness = container.spec.get("readinessProbe")
        clock = time.monotonic()
        if not container.started:  # as the kubelet: nothing else is probed before startup passes
            startup = container.spec["startupProbe"]
            if clock >= container.startup_due:
                container.startup_due = clock + float(startup.get("periodSeconds", 10))
                if self._run_probe(local, container, startup):
                    container.started = True
                else:
                    container.startup_failures += 1
                    self._kill_past_threshold(
                        local, container, container.startup_failures, startup, "startup"
                    )
            return
        if readiness and clock >= container.probe_due:
            container.probe_due = clock + float(readiness.get("periodSeconds", 10))
            if self._run_probe(local, container, readiness):
                container.readiness_successes += 1
                container.readiness_failures = 0
                if container.readiness_successes >= int(readiness.get("successThreshold", 1)):
                    container.ready = True
            else:
                container.readiness_successes = 0
                container.readiness_failures += 1
                if container.readiness_failures >= int(readiness.get("failureThreshold", 3)):
                    container.ready = False
        liveness = container.spec.get("livenessProbe")
        if liveness and clock >= container.liveness_due:
            container.liveness_due = clock + float(liveness.get("periodSeconds", 10))
            if self._run_probe(local, container, liveness):
                container.liveness_failures = 0
            else:
                container.liveness_failures += 1
                self._kill_past_threshold(local, container, container.liveness_failures, liveness, "liveness")

    @staticmethod
    def _kill_past_threshold(
        local: LocalPod, container: Container, failures: int, probe: dict[str, Any], kind: str
    ) -> None:
        """A startup or liveness probe that failed `failureThreshold` times kills the container
        (its restart policy decides what follows), as the kubelet does."""
        if failures >= int(probe.get("failureThreshold", 3)) and container.process:
            log.info("pod %s container %s failed its %s probe; killing it", local.key, container.name, kind)
            _signal_group(container.process, signal.SIGKILL)

    def _run_probe(self, local: LocalPod, container: Container, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "exec" in probe:
            env = container.environment or self._environment(local, container.spec)
            command = list(probe["exec"]["command"])
            if container.isolated and container.process is not None:
                command = exec_in(container.process.pid, command)
            try:
                done = subprocess.run(
                    command, env=env, cwd=str(local.directory), timeout=timeout,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired):
                return False
            return done.returncode == 0
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = get.get("port")
            if isinstance(port, str):
                named = [p for p in container.spec.get("ports", []) if p.get("name") == port]
                port = named[0]["containerPort"] if named else port
            url = f"http://{local.address}:{port}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as reply:
                    return bool(200 <= reply.status < 400)
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                return False
        if "tcpSocket" in probe:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((local.address, int(probe["tcpSocket"]["port"])), timeout=timeout),
            ):
                return True
            return False
        return True

    # --- status --------------------------------------------------------------------------

    def _container_status(self, container: Container) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": container.name,
            "image": container.spec.get("image", ""),
            "imageID": "",
            "restartCount": container.restarts,
            "ready": container.ready and container.process is not None,
            "started": container.process is not None and container.started,
        }
        if container.process is not None:
            status["state"] = {"running": {"startedAt": container.started_at}}
            status["containerID"] = f"local-process://{container.process.pid}"
        elif container.waiting:
            status["state"] = {"waiting": dict(container.waiting)}
        elif container.backoff_until:
            status["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}}
        else:
            status["state"] = {"terminated": container.terminated or {"exitCode": 0, "reason": "Completed"}}
        last = container.terminated if container.backoff_until else container.last_terminated
        if last:
            status["lastState"] = {"terminated": last}
        return status

    def _report(self, local: LocalPod) -> None:
        statuses = [self._container_status(c) for c in local.containers]
        ready = all(s["ready"] for s in statuses)
        if local.finished:
            failed = any((c.terminated or {}).get("exitCode", 0) != 0 for c in local.containers)
            phase = "Failed" if failed else "Succeeded"
        elif any(c.waiting for c in local.containers):
            phase = "Pending"
        else:
            phase = "Running"
        stamp = now()

        def condition(kind: str, value: bool) -> dict[str, str]:
            # A condition's lastTransitionTime moves only when its status does (as a kubelet's).
            text = str(value)
            if local.transitions.get(kind, ("", ""))[0] != text:
                local.transitions[kind] = (text, stamp)
            return {"type": kind, "status": text, "lastTransitionTime": local.transitions[kind][1]}

        status = {
            "phase": phase,
            "hostIP": self.node_address,
            "podIP": local.address,
            "podIPs": [{"ip": local.address}],
            "startTime": local.started_at,
            "containerStatuses": statuses,
            "conditions": [
                condition("Initialized", True),
                condition("Ready", ready and phase == "Running"),
                condition("ContainersReady", ready),
                condition("PodScheduled", True),
            ],
        }
        fingerprint = json.dumps(
            [phase, ready, [(s["state"].keys(), s["restartCount"], s["ready"]) for s in statuses]],
            default=list,
        )
        if fingerprint == local.reported:
            return
        pids = {c.name: c.process.pid for c in local.containers if c.process is not None}
        self._patch_status(local, status, pids)
        local.reported = fingerprint

    def _patch_status(
        self, local: LocalPod, status: dict[str, Any], pids: dict[str, int] | None = None
    ) -> None:
        try:
            if pids is not None:  # first: whoever sees the new status sees these process ids
                self.core.patch_namespaced_pod(
                    local.name,
                    local.namespace,
                    {"metadata": {"annotations": {PID_ANNOTATION: json.dumps(pids)}}},
                )
            self.core.patch_namespaced_pod_status(local.name, local.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise

    # --- stopping ------------------------------------------------------------------------

    def _terminate(self, local: LocalPod, grace: float) -> None:
        """What the kubelet does for a graceful delete: SIGTERM, the grace period, SIGKILL, remove."""
        started = time.monotonic()
        processes = [c.process for c in local.containers if c.process is not None]
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = started + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.05)
        for process in processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        for container in local.containers:
            _kill_remains(_tag(local, container))
        log.info("pod %s stopped in %.2fs (grace %.0fs)", local.key, time.monotonic() - started, grace)
        local.finished = True
        self._release(local)
        self._remove(local.namespace, local.name, local.uid)
        with self.lock:
            if self.pods.get(local.key) is local:
                del self.pods[local.key]

    def _remove(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
                ),
            )

    def _gone(self, local: LocalPod) -> None:
        """The pod object vanished (force-deleted): its processes go at once."""
        for container in local.containers:
            if container.process is not None and container.process.poll() is None:
                _signal_group(container.process, signal.SIGKILL)
            _kill_remains(_tag(local, container))
        local.finished = True
        self._release(local)
        self.pods.pop(local.key, None)

    def stop_all(self) -> None:
        with self.lock:
            pods = list(self.pods.values())
        for local in pods:
            for container in local.containers:
                if container.process is not None and container.process.poll() is None:
                    _signal_group(container.process, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for local in pods:
            for container in local.containers:
                if container.process is None:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    container.process.wait(max(0.0, deadline - time.monotonic()))
                if container.process.poll() is None:
                    _signal_group(container.process, signal.SIGKILL)
        for local in pods:
            for container in local.containers:
                _kill_remains(_tag(local, container))
            self._release(local)
        if self.proxy is not None:
            self.proxy.close()

    def _release(self, local: LocalPod) -> None:
        """The pod's network namespace and address go back (its processes are gone)."""
        if self.network is not None and local.sandbox is not None:
            self.network.remove_pod(local.uid)

    # --- storage -------------------------------------------------------------------------

    def _ensure_storage_class(self) -> None:
        """The cluster's default StorageClass, provisioned by this agent (as kind's local-path)."""
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": self.storage_class,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": LOCAL_PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        with contextlib.suppress(ApiException):
            client.StorageV1Api(self.api).create_storage_class(body)

    def _provision(self) -> None:
        """A hostPath PersistentVolume under the workdir for each pending claim of the class."""
        while not self.stopping.wait(0.5):
            try:
                for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
                    if claim.spec.storage_class_name != self.storage_class or claim.spec.volume_name:
                        continue
                    self._provision_one(claim)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                log.warning("provisioning failed: %r", error)

    def _provision_one(self, claim: client.V1PersistentVolumeClaim) -> None:
        name = f"pvc-{claim.metadata.uid}"
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        body = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": LOCAL_PROVISIONER}},
            "spec": {
                "capacity": {"storage": (claim.spec.resources.requests or {}).get("storage", "1Gi")},
                "accessModes": claim.spec.access_modes or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": self.storage_class,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": claim.metadata.namespace, "name": claim.metadata.name,
                    "uid": claim.metadata.uid,
                },
            },
        }  # fmt: skip
        try:
            self.core.create_persistent_volume(body)
            log.info("provisioned %s for %s/%s", name, claim.metadata.namespace, claim.metadata.name)
        except ApiException as error:
            if error.status != 409:
                raise


def _tag(local: LocalPod, container: Container) -> str:
    return f"{local.uid}/{container.name}"


def _kill_remains(tag: str) -> int:
    """SIGKILL every process of this container (what its cgroup would hold); how many.

    A process is the container's if its environment carries the container's tag, or if it is
    in the process group of one that does: a process that renames itself (vLLM's engine core
    and workers, through setproctitle) overwrites the environment /proc shows, so it is found
    through the engine's group it was started in."""
    marker = f"{CONTAINER_TAG}={tag}".encode()
    ours: set[int] = set()
    groups: set[int] = set()
    processes = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    for pid in processes:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
            if marker in environment.split(b"\0"):
                ours.add(pid)
                groups.add(os.getpgid(pid))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    groups -= {0, 1, os.getpgrp()}  # never init's nor the agent's own
    for pid in processes:
        with contextlib.suppress(OSError):
            if pid not in ours and os.getpgid(pid) in groups:
                ours.add(pid)
    killed = 0
    for pid in ours:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    if killed:
        log.info("killed %d leftover processes of container %s", killed, tag)
    return killed


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values ($$ escapes)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8, help=f"{GPU_RESOURCE} per node")
    parser.add_argument("--node-prefix", default="troughfill-node")
    parser.add_argument("--gpu-product", default="local-process-gpu", help="nvidia.com/gpu.product label")
    parser.add_argument("--pod-cidr", help="give each pod a network namespace and an address from this CIDR")
    parser.add_argument(
        "--service-cidr", help="the API server's --service-cluster-ip-range (with --pod-cidr)"
    )
    parser.add_argument("--network-suffix", default="0", help="names this agent's bridge and namespaces")
    parser.add_argument(
        "--images", type=Path, help="JSON: the local images pods may name (others: ErrImagePull)"
    )
    parser.add_argument(
        "--storage-class", help="provision PVCs of this (default) StorageClass as hostPath volumes"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    network = None
    if args.pod_cidr:
        if not args.service_cidr:
            parser.error("--pod-cidr needs --service-cidr")
        network = PodNetwork(args.pod_cidr, args.service_cidr, args.network_suffix)
        network.setup()
    agent = NodeAgent(
        api,
        args.workdir,
        [f"{args.node_prefix}-{i}" for i in range(args.nodes)],
        args.gpus,
        gpu_product=args.gpu_product,
        images=load_images(args.images) if args.images else None,
        network=network,
        storage_class=args.storage_class,
    )

    def stop(*_: object) -> None:
        agent.stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        agent.run()
    except SystemExit:
        agent.stop_all()
    finally:
        if network is not None:
            network.close()


if __name__ == "__main__":
    main()
