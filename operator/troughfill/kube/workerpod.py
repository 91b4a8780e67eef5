"""The batch worker pod of a job: pure, from the job, its template, its pool and its admission.

Everything a user could use to pick an image, a GPU type or a model comes from the
admin's ModelTemplate and BatchPool; from the job only the allowlisted engine flags pass, as
admission checked and produced them (`--name=value`, one word each). The pod runs
`troughfill worker run`, which starts the engine from the template's command and reports
through the ledger.

Workers are bare pods owned by the BatchInference (not a Deployment or Jobs): the planner
chooses *which* worker stops (least unsaved progress first) and *how* (drain or yield), which
a ReplicaSet's scale-down cannot be told (pod-deletion-cost is only a hint), and a finished
worker must not be restarted in place. The pods still carry
pod-deletion-cost, kept up to date from the worker's progress (see deletion_cost), for
whatever else on the cluster reads it.
"""

import math
from dataclasses import dataclass
from typing import Any

from troughfill import constants
from troughfill.api.admission import Admission
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.api.types import parse_duration

WORKER_CONTAINER = "worker"
MAX_DELETION_COST = 2**31 - 1
YIELD_GRACE_SECONDS = 10
"""A yielding worker exits in about 2 s; the rest is margin before SIGKILL."""
STARTUP_PROBE_SECONDS = 5
"""As often as readiness: a worker is Ready soon after its engine serves."""
STARTUP_ALLOWANCE = 3
"""A worker whose engine is not serving after this many times the template's cold-start
estimate (plus a minute) is restarted."""


def startup_probe_failures(cold_start_seconds: int) -> int:
    return math.ceil((STARTUP_ALLOWANCE * cold_start_seconds + 60) / STARTUP_PROBE_SECONDS)


def deletion_cost(ready: bool, unsaved_tokens: int) -> str:
    """The pod-deletion-cost of a worker, in the planner's victim order: a worker not serving
    yet costs nothing to delete (0); a serving one costs 1 + the order of magnitude (bit
    length) of the tokens a kill would throw away now. Coarse on purpose: the annotation is
    patched only when the value changes, not every time a token is generated. Servers
    before 1.22 ignore the annotation; it is written anyway (a hint, never a requirement)."""
    if not ready:
        return "0"
    return str(min(MAX_DELETION_COST, 1 + max(0, unsaved_tokens).bit_length()))


@dataclass(frozen=True)
class WorkerEnvironment:
    """Operator-wide settings every worker needs (where the ledger and object storage are)."""

    ledger_url: str
    """The ledger service (workers hold no Redis credential: they call it with their job's token)."""
    s3_endpoint_url: str | None = None
    s3_addressing_style: str = "auto"
    worker_command: tuple[str, ...] = ("troughfill",)
    """How the worker program is invoked in the template's image."""
    extra_env: tuple[tuple[str, str], ...] = ()


def job_secret_name(job: BatchInference) -> str:
    """The Secret in the job's namespace that holds what its workers alone may know."""
    return f"{job.metadata.name[:40]}-troughfill-{job.metadata.uid_text[:8]}"


def owner_reference(job: BatchInference) -> dict[str, Any]:
    return {
        "apiVersion": constants.GROUP_VERSION,
        "kind": constants.KIND_BATCH_INFERENCE,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_secret(job: BatchInference, data: dict[str, str]) -> dict[str, Any]:
    """The job's workers' Secret: its storage grant's credentials (copied from the admin's Secret
    in the operator's namespace) and its ledger token. Owned by the job: deleting the job deletes
    it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": job_secret_name(job),
            "namespace": job.metadata.ns,
            "labels": {
                constants.LABEL_PART_OF: constants.PART_OF_VALUE,
                constants.LABEL_MANAGED_BY: constants.PART_OF_VALUE,
                constants.LABEL_JOB_UID: job.metadata.uid_text,
            },
            "ownerReferences": [owner_reference(job)],
        },
        "stringData": dict(data),
    }


def secret_env(job: BatchInference) -> list[dict[str, Any]]:
    """The worker's variables from its job's Secret, each key by name (never the whole Secret:
    the Secret is in the tenant's namespace, and whatever else was put in it stays out of the
    worker). The ledger token is required; storage credentials are there only for grants with a
    Secret."""
    name = job_secret_name(job)
    required = [(constants.SECRET_LEDGER_TOKEN, False)]
    optional = [(key, True) for key in sorted(constants.STORAGE_SECRET_KEYS)]
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": is_optional}}}
        for key, is_optional in required + optional
    ]


def job_ref(job: BatchInference) -> str:
    return f"{job.metadata.ns}/{job.metadata.name}/{job.metadata.uid_text}"


def model_argument(uri: str) -> str:
    """What vLLM's --model takes for a template's model URI (a local path or a hub name)."""
    for prefix in ("file://", "hf://"):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def worker_labels(job: BatchInference, template: ModelTemplate) -> dict[str, str]:
    return {
        constants.LABEL_PART_OF: constants.PART_OF_VALUE,
        constants.LABEL_COMPONENT: constants.COMPONENT_WORKER,
        constants.LABEL_MANAGED_BY: constants.PART_OF_VALUE,
        constants.LABEL_JOB_NAME: job.metadata.name,
        constants.LABEL_JOB_UID: job.metadata.uid_text,
        constants.LABEL_POOL: template.spec.pool_ref,
        constants.LABEL_TEMPLATE: template.metadata.name,
        constants.LABEL_LEDGER_CLIENT: "true",
    }


def worker_pod(
    name: str,
    job: BatchInference,
    template: ModelTemplate,
    pool: BatchPool,
    admission: Admission,
    *,
    environment: WorkerEnvironment,
) -> dict[str, Any]:
    """The pod manifest for one worker of `job` (a plain dict, as the API takes it)."""
    tspec = template.spec
    served = tspec.model.served_model_name
    drain_seconds = int(parse_duration(pool.spec.drain_grace_period).total_seconds())
    ref = job_ref(job)
    engine = [
        *tspec.engine.command,
        *tspec.engine.args,
        "--model", model_argument(tspec.model.uri),
        "--served-model-name", served,
        "--host", "127.0.0.1",
        "--port", constants.ENGINE_PORT_PLACEHOLDER,
        *admission.engine_args,  # one `--name=value` word per flag, as admission checked it
    ]  # fmt: skip
    command = [
        *environment.worker_command, "worker", "run",
        "--job", ref,
        "--served-model", served,
        # A SIGTERM the operator did not announce (scheduler preemption, node drain) means the
        # GPUs are wanted now: yield. The operator's own drains are announced through the ledger.
        "--on-sigterm", "yield",
        "--drain-timeout", str(drain_seconds),
        "--engine-port", "auto",
        "--", *engine,
    ]  # fmt: skip
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TROUGHFILL_LEDGER_URL", "value": environment.ledger_url},
        *secret_env(job),
    ]
    if environment.s3_endpoint_url:
        env.append({"name": "TROUGHFILL_S3_ENDPOINT_URL", "value": environment.s3_endpoint_url})
    if environment.s3_addressing_style != "auto":
        env.append({"name": "TROUGHFILL_S3_ADDRESSING_STYLE", "value": environment.s3_addressing_style})
    env += [{"name": k, "value": v} for k, v in environment.extra_env]
    env += [e.manifest() for e in tspec.engine.env]
    gpu = pool.spec.gpus.resource_name
    resources = tspec.resources.model_dump()
    resources.setdefault("requests", {})[gpu] = str(tspec.gpus_per_worker)
    resources.setdefault("limits", {})[gpu] = str(tspec.gpus_per_worker)
    check = [*environment.worker_command, "worker", "check", "--job", ref]
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": tspec.image,
        "command": command,
        "env": env,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "resources": resources,
        # Ready once the engine answers and the worker heartbeats. The engine's cold start is
        # the template's estimate, but a first start can take several times it (compiling,
        # a busy node): the startup probe allows STARTUP_ALLOWANCE times it before the pod is
        # restarted, and liveness judges only after startup. A check is a Python start-up plus
        # one Redis read: seconds on a busy node, so no 1 s timeout.
        "startupProbe": {
            "exec": {"command": check},
            "periodSeconds": STARTUP_PROBE_SECONDS,
            "timeoutSeconds": 10,
            "failureThreshold": startup_probe_failures(tspec.cold_start_seconds),
        },
        "readinessProbe": {
            "exec": {"command": check},
            "periodSeconds": 5,
            "timeoutSeconds": 10,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "exec": {"command": check},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "failureThreshold": 6,
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator replaces failed workers and notices crash loops
        # What the restricted Pod Security Standard asks: never root, the runtime's seccomp profile,
        # no privilege escalation, no capabilities (vLLM needs none). Images whose user is root
        # run as the template's runAsUser.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": tspec.run_as_user,
            "runAsGroup": tspec.run_as_user,
            "fsGroup": tspec.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "priorityClassName": admission.priority_class_name or pool.spec.default_priority_class_name,
        "terminationGracePeriodSeconds": max(drain_seconds + 5, YIELD_GRACE_SECONDS),
        "containers": [container],
    }
    if tspec.node_selector:
        pod_spec["nodeSelector"] = dict(tspec.node_selector)
    if tspec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in tspec.tolerations]
    if tspec.service_account_name:
        pod_spec["serviceAccountName"] = tspec.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # workers never call the Kubernetes API
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": job.metadata.ns,
            "labels": worker_labels(job, template),
            "annotations": {constants.ANNOTATION_POD_DELETION_COST: deletion_cost(False, 0)},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
