"""The control plane harness: Kopf on it, pods as processes, graceful stops, real preemption."""

import json
import os
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import Kube
from troughfill_dev.localcluster.nodeagent import GPU_RESOURCE, PID_ANNOTATION
from troughfill_dev.localcluster.services import wait_until as until

IMAGE = os.environ.get("TROUGHFILL_E2E_IMAGE", "python:3.11-slim")
"""Ignored by the node agent (it runs the command here); what a real cluster pulls."""

TERM_AWARE = textwrap.dedent(
    """
    import os, signal, sys, time
    def stop(*_):
        print("got SIGTERM", flush=True)
        time.sleep(float(os.environ.get("STOP_SECONDS", "0.3")))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("running as", os.environ.get("POD_NAME"), flush=True)
    while True:
        time.sleep(0.1)
    """
)
DEAF = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\nwhile True: time.sleep(0.1)\n"
)


def container(script: str, gpus: int = 0, stop_seconds: float = 0.3) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "main",
        "image": IMAGE,
        "command": ["python", "-c", script],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "STOP_SECONDS", "value": str(stop_seconds)},
        ],
        "resources": {"requests": {"cpu": "10m"}},
    }
    if gpus:
        spec["resources"] = {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}}
    return spec


def running_pods(kube: Kube, namespace: str, selector: str) -> list[client.V1Pod]:
    pods = kube.core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]


def local_pids(pod: client.V1Pod) -> dict[str, int]:
    raw = (pod.metadata.annotations or {}).get(PID_ANNOTATION)
    return dict(json.loads(raw)) if raw else {}


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# --- the control plane itself ------------------------------------------------------------------


def test_the_control_plane_authorises_with_rbac(kube: Kube, tmp_path: Path) -> None:
    if not kube.local or kube.plane is None:
        pytest.skip("the harness's own identities")
    agent = client.CoreV1Api(config.new_client_from_config(config_file=str(kube.plane.node_agent_kubeconfig)))
    assert agent.list_node().items  # what a kubelet may do
    with pytest.raises(ApiException) as refused:
        agent.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="not-for-agents")))
    assert refused.value.status == 403
    kubectl = subprocess.run(
        [kube.kubectl(), "--kubeconfig", str(kube.kubeconfig), "get", "nodes", "-o", "json"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    nodes = json.loads(kubectl.stdout)["items"]
    assert {n["status"]["allocatable"][GPU_RESOURCE] for n in nodes} == {"8"}
    print(f"\ncontrol plane started in {kube.plane.started_seconds:.1f}s")


# --- Kopf --------------------------------------------------------------------------------------

PROBE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "probes.e2e.troughfill.dev"},
    "spec": {
        "group": "e2e.troughfill.dev",
        "scope": "Namespaced",
        "names": {"plural": "probes", "singular": "probe", "kind": "Probe"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"message": {"type": "string"}}},
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}

PROBE_OPERATOR = """
import kopf

@kopf.on.login()  # it runs with a registry of its own, without Kopf's default login handlers
def login(**kwargs):
    return kopf.login_via_client(**kwargs)

@kopf.on.create("e2e.troughfill.dev", "v1", "probes")
def echo(spec, patch, **_):
    patch.status["echo"] = spec["message"]
"""


def test_kopf_reacts_to_a_custom_resource(kube: Kube, namespace: str, tmp_path: Path) -> None:
    extensions = client.ApiextensionsV1Api(kube.api)
    try:
        extensions.create_custom_resource_definition(PROBE_CRD)
    except ApiException as error:
        if error.status != 409:
            raise
    until(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in extensions.read_custom_resource_definition("probes.e2e.troughfill.dev").status.conditions
            or []
        ),
        30,
        "the CRD established",
    )
    operator = tmp_path / "probe_operator.py"
    operator.write_text(PROBE_OPERATOR)
    custom = client.CustomObjectsApi(kube.api)
    args = ["run", "--standalone", "--namespace", namespace, str(operator)]
    # Its own handler registry: an earlier test's `kopf run -m troughfill.handlers` left
    # troughfill's handlers in Kopf's default one, and the probe would run them too (their
    # startup handler serving metrics on the default 0.0.0.0:9090 for the rest of this process,
    # which took the port from the install tier's Services).
    previous = kopf.get_default_registry()
    kopf.set_default_registry(kopf.OperatorRegistry())
    try:
        runner = run_probe(args, namespace, custom)
    finally:
        kopf.set_default_registry(previous)
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None
    assert "Handler 'echo' succeeded" in runner.output, runner.output
    assert "Activity 'configure'" not in runner.output, runner.output[-3000:]  # troughfill's startup handler


def run_probe(args: list[str], namespace: str, custom: client.CustomObjectsApi) -> KopfRunner:
    with KopfRunner(args, timeout=60) as runner:
        message = f"hello {uuid.uuid4().hex[:6]}"
        created = time.monotonic()
        custom.create_namespaced_custom_object(
            "e2e.troughfill.dev", "v1", namespace, "probes",
            {"apiVersion": "e2e.troughfill.dev/v1", "kind": "Probe", "metadata": {"name": "p1"},
             "spec": {"message": message}},
        )  # fmt: skip

        def echoed() -> bool:
            obj = custom.get_namespaced_custom_object("e2e.troughfill.dev", "v1", namespace, "probes", "p1")
            return bool(obj.get("status", {}).get("echo") == message)

        try:
            until(echoed, 30, "Kopf's status patch")
        except TimeoutError:
            print(
                "\n".join(line for line in runner.output.splitlines() if "kubernetes.client" not in line)[
                    -8000:
                ]
            )
            raise
        reacted = time.monotonic() - created
    print(f"\nKopf reacted to the custom resource in {reacted:.2f}s")
    return runner


# --- pods as processes ---------------------------------------------------------------------------


def test_a_deployment_s_pods_run_and_stop_on_scale_down_within_their_grace_period(
    kube: Kube, namespace: str
) -> None:
    apps = client.AppsV1Api(kube.api)
    labels = {"app": "sleeper"}
    grace = 10
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "sleeper"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": grace,
                        "containers": [container(TERM_AWARE, stop_seconds=0.5)],
                    },
                },
            },
        },
    )
    pods = until(
        lambda: (p := running_pods(kube, namespace, "app=sleeper")) and len(p) == 3 and p,
        60,
        "3 running pods",
    )
    if kube.local:
        for pod in pods:
            pid = local_pids(pod)["main"]
            assert process_alive(pid), f"{pod.metadata.name}'s process {pid} is not running"
    started = time.monotonic()
    apps.patch_namespaced_deployment_scale(
        namespace=namespace, name="sleeper", body={"spec": {"replicas": 1}}
    )

    def one_left() -> bool:
        return len(kube.core.list_namespaced_pod(namespace, label_selector="app=sleeper").items) == 1

    until(one_left, grace + 10, "scale-down to one pod")
    seconds = time.monotonic() - started
    assert seconds < grace, f"the scale-down took {seconds:.1f}s, beyond the grace period"
    survivor = kube.core.list_namespaced_pod(namespace, label_selector="app=sleeper").items[0].metadata.name
    if kube.local and kube.agent_workdir is not None:
        stopped = [p for p in pods if p.metadata.name != survivor]
        assert len(stopped) == 2
        for pod in stopped:
            assert not process_alive(local_pids(pod)["main"])
            (log,) = kube.agent_workdir.glob(f"{namespace}_{pod.metadata.name}_*/main.log")
            assert "got SIGTERM" in log.read_text()  # it was asked, not killed
    print(f"\nscale-down 3 -> 1: pods stopped and removed in {seconds:.2f}s (grace {grace}s)")


def test_a_pod_that_ignores_sigterm_is_killed_after_its_grace_period(kube: Kube, namespace: str) -> None:
    grace = 2
    kube.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "deaf", "labels": {"app": "deaf"}},
            "spec": {"terminationGracePeriodSeconds": grace, "containers": [container(DEAF)]},
        },
    )
    (pod,) = until(lambda: running_pods(kube, namespace, "app=deaf"), 60, "the pod running")
    # Running means its process started, not that Python has reached the signal handler yet.
    if kube.local and kube.agent_workdir is not None:
        workdir = kube.agent_workdir
        until(
            lambda: any(
                "ignoring SIGTERM" in log.read_text() for log in workdir.glob(f"{namespace}_deaf_*/main.log")
            ),
            30,
            "the container ignoring SIGTERM",
        )
    else:
        time.sleep(3)
    started = time.monotonic()
    kube.core.delete_namespaced_pod("deaf", namespace)

    def gone() -> bool:
        try:
            kube.core.read_namespaced_pod("deaf", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    until(gone, grace + 15, "the pod removed")
    seconds = time.monotonic() - started
    assert seconds >= grace - 0.2, f"removed after {seconds:.2f}s: the grace period was not honoured"
    assert seconds < grace + 5
    if kube.local:
        assert not process_alive(local_pids(pod)["main"])
    print(f"\na pod ignoring SIGTERM was removed {seconds:.2f}s after its delete (grace {grace}s)")


# Starts a child in a session of its own (as the worker starts its engine), writes its pid, exits.
# The child starts a grandchild with an empty environment, as vLLM's engine core looks once it
# has renamed itself (setproctitle overwrites the environment /proc shows).
ESCAPER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    grandchild = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], env={}); "
        "open('grandchild.pid', 'w').write(str(g.pid)); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", grandchild], start_new_session=True)
    open("child.pid", "w").write(str(child.pid))
    time.sleep(float(os.environ["LINGER"]))
    """
)


def test_what_a_container_spawned_goes_with_it_even_outside_its_process_group(
    kube: Kube, namespace: str
) -> None:
    """A container runtime kills everything in a container when it ends; the node agent does
    the same for processes that left the container's process group (a worker's engine)."""
    if not kube.local or kube.agent_workdir is None:
        pytest.skip("local processes of the node agent")
    agent_workdir = kube.agent_workdir
    for name, linger in (("ends", "1"), ("deleted", "600")):
        spec = container(ESCAPER)
        spec["env"].append({"name": "LINGER", "value": linger})
        kube.core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [spec]},
            },
        )

        def pid_in(file: str, pod_name: str = name) -> int | None:
            found = list(agent_workdir.glob(f"{namespace}_{pod_name}_*/{file}"))
            text = found[0].read_text() if found else ""
            return int(text) if text else None

        pids = [
            until(lambda f=file: pid_in(f), 60, f"{name}: {file}") for file in ("child.pid", "grandchild.pid")
        ]
        assert all(process_alive(pid) for pid in pids)
        if name == "deleted":
            kube.core.delete_namespaced_pod(name, namespace)
        for pid in pids:
            until(
                lambda p=pid: not process_alive(p), 30, f"{name}: what it spawned killed with its container"
            )


def test_a_crashing_container_is_restarted_with_back_off(kube: Kube, namespace: str) -> None:
    kube.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crasher"},
            "spec": {"containers": [container("import sys; sys.exit(3)")]},
        },
    )

    def restarted_twice() -> bool:
        pod = kube.core.read_namespaced_pod("crasher", namespace)
        statuses = pod.status.container_statuses or []
        return bool(statuses and statuses[0].restart_count >= 2)

    until(restarted_twice, 60, "two restarts")
    status = kube.core.read_namespaced_pod("crasher", namespace).status.container_statuses[0]
    terminated = status.last_state.terminated
    assert terminated is not None
    assert terminated.exit_code == 3


def test_liveness_waits_for_the_startup_probe(kube: Kube, namespace: str, tmp_path: Path) -> None:
    """A slow starter is not killed by its liveness probe while its startup probe still allows
    it; a container that never starts is killed once the startup probe gives up."""
    started = tmp_path / "started"
    slow = container(
        f"import pathlib, time\ntime.sleep(3)\npathlib.Path({str(started)!r}).touch()\ntime.sleep(600)"
    )
    check = {"exec": {"command": ["test", "-f", str(started)]}, "periodSeconds": 1, "failureThreshold": 1}
    slow.update(startupProbe={**check, "failureThreshold": 30}, livenessProbe=check)
    never = container("import time; time.sleep(600)")
    never["name"] = "never"
    never.update(startupProbe={**check, "exec": {"command": ["false"]}, "failureThreshold": 2})
    kube.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "slow"},
            "spec": {"containers": [slow, never]},
        },
    )

    def statuses() -> dict[str, client.V1ContainerStatus]:
        pod = kube.core.read_namespaced_pod("slow", namespace)
        return {c.name: c for c in pod.status.container_statuses or []}

    until(lambda: statuses().get("main") and statuses()["main"].started, 30, "the slow starter started")
    until(
        lambda: statuses().get("never") and statuses()["never"].restart_count >= 1,
        30,
        "the never-starter killed",
    )
    time.sleep(2)
    assert statuses()["main"].restart_count == 0  # liveness would have killed it at once without startup


# --- preemption -----------------------------------------------------------------------------------


def test_a_higher_priority_pod_preempts_a_lower_priority_one(
    kube: Kube, namespace: str, gpu_node: tuple[str, int]
) -> None:
    node, gpus = gpu_node
    scheduling = client.SchedulingV1Api(kube.api)
    suffix = namespace
    low, high = f"e2e-low-{suffix}", f"e2e-high-{suffix}"
    for name, value in ((low, 1000), (high, 1_000_000)):
        scheduling.create_priority_class(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name},
                "value": value,
            }
        )
    try:

        def pod(name: str, priority: str) -> dict[str, Any]:
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {
                    "priorityClassName": priority,
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "terminationGracePeriodSeconds": 10,
                    "containers": [container(TERM_AWARE, gpus=gpus, stop_seconds=0.5)],
                },
            }

        kube.core.create_namespaced_pod(namespace, pod("batch", low))
        until(lambda: running_pods(kube, namespace, "app=batch"), 60, "the low-priority pod running")
        created = time.monotonic()
        kube.core.create_namespaced_pod(namespace, pod("online", high))
        events: dict[str, float] = {}

        def progressed() -> bool:
            pods = {p.metadata.name: p for p in kube.core.list_namespaced_pod(namespace).items}
            clock = time.monotonic() - created
            online = pods.get("online")
            if online is not None and online.status.phase == "Pending":
                events.setdefault("pending", clock)
            if "batch" in pods and pods["batch"].metadata.deletion_timestamp:
                events.setdefault("victim_deleting", clock)
            if "batch" not in pods:
                events.setdefault("victim_gone", clock)
            if online is not None and online.status.phase == "Running":
                events.setdefault("running", clock)
            return "running" in events

        until(progressed, 60, "the high-priority pod running", interval=0.02)
        assert "victim_gone" in events, events
        assert events["victim_gone"] <= events["running"]
        print(
            "\npreemption: online pod pending at {pending:.2f}s, victim deleting at {deleting:.2f}s, "
            "victim gone at {gone:.2f}s, online pod running at {running:.2f}s".format(
                pending=events.get("pending", 0.0),
                deleting=events.get("victim_deleting", events["victim_gone"]),
                gone=events["victim_gone"],
                running=events["running"],
            )
        )
    finally:
        for name in (low, high):
            scheduling.delete_priority_class(name)


def test_a_pod_waits_for_the_configmap_its_volume_names_then_runs(kube: Kube, namespace: str) -> None:
    """As the kubelet does: a volume source that does not exist yet keeps the pod Pending (a new
    namespace's kube-root-ca.crt comes seconds after the namespace), it does not fail it."""
    if not kube.local:
        pytest.skip("the node agent's own behaviour (a kubelet does the same)")
    spec = container("import time\nprint(open('/config/greeting').read(), flush=True)\ntime.sleep(600)")
    spec["volumeMounts"] = [{"name": "config", "mountPath": "/config"}]
    kube.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "patient", "labels": {"app": "patient"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [spec],
                "volumes": [{"name": "config", "configMap": {"name": "later"}}],
            },
        },
    )
    time.sleep(3)
    pod = kube.core.read_namespaced_pod("patient", namespace)
    assert pod.status.phase == "Pending", pod.status
    kube.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "later"}, "data": {"greeting": "hello"}}
    )
    until(
        lambda: running_pods(kube, namespace, "app=patient"), 30, "the pod running once its ConfigMap exists"
    )
    kube.core.delete_namespaced_pod("patient", namespace)
