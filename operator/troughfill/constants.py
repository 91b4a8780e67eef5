"""Every name troughfill puts on the cluster or in Redis, in one place.

Changing a value here changes a wire format: labels, annotations, the finalizer and
Redis key prefixes are read back by older and newer operator versions alike.
"""

from typing import Final

API_GROUP: Final = "troughfill.io"
API_VERSION: Final = "v1alpha1"
GROUP_VERSION: Final = f"{API_GROUP}/{API_VERSION}"

KIND_BATCH_INFERENCE: Final = "BatchInference"
KIND_BATCH_POOL: Final = "BatchPool"
KIND_MODEL_TEMPLATE: Final = "ModelTemplate"

# Kopf's own annotations (progress, last-handled-configuration) live under this prefix
# instead of kopf.zalando.org, so two operators on one cluster never read each other's state.
ANNOTATION_PREFIX: Final = "troughfill.io"
FINALIZER: Final = "troughfill.io/finalizer"

LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_JOB_NAME: Final = "troughfill.io/batchinference"
LABEL_JOB_UID: Final = "troughfill.io/batchinference-uid"
LABEL_POOL: Final = "troughfill.io/pool"
LABEL_TEMPLATE: Final = "troughfill.io/template"
# On worker pods: admits them to the ledger Redis (NetworkPolicy); only the operator may set it
# (manifests/base/admissionpolicy.yaml).
LABEL_LEDGER_CLIENT: Final = "troughfill.io/ledger-client"
PART_OF_VALUE: Final = "troughfill"
COMPONENT_WORKER: Final = "batch-worker"
COMPONENT_OPERATOR: Final = "operator"

# Kubernetes honours this annotation (1.22+) when a ReplicaSet picks pods to remove;
# the operator sets it from progress so the cheapest worker goes first where it applies.
ANNOTATION_POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"

# The PriorityClass batch workers run at unless the pool allows another for the namespace.
DEFAULT_BATCH_PRIORITY_CLASS: Final = "troughfill-batch"
# Below the default priority (0) of any pod that names no class, so online serving always wins.
DEFAULT_BATCH_PRIORITY_VALUE: Final = -100

DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"
OPERATOR_NAMESPACE: Final = "troughfill-system"
# The ledger service (manifests/base/ledger.yaml): workers reach the ledger only through it.
LEDGER_SERVICE_NAME: Final = "troughfill-ledger"
LEDGER_SERVICE_PORT: Final = 8090
# Keys of a job's Secret that its worker container reads (never the whole Secret).
SECRET_LEDGER_TOKEN: Final = "TROUGHFILL_LEDGER_TOKEN"
STORAGE_SECRET_KEYS: Final = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"}
)
"""What of a storage grant's Secret is used (and copied to the job's workers); nothing else."""

REDIS_KEY_PREFIX: Final = "troughfill"

# Under a job's output prefix, its workers' segments live in SEGMENTS_DIR/<job uid>/; only that
# directory is ever deleted, and no outputURL may lie inside a SEGMENTS_DIR.
SEGMENTS_DIR: Final = "_segments"

# Bounds shared by the API models, the generated CRDs and the admission checks.
MAX_COMPLETION_WINDOW: Final = "168h"
MIN_COMPLETION_WINDOW: Final = "1m"
MAX_WORKERS_PER_JOB: Final = 4096
MAX_RETRY_ATTEMPTS: Final = 20
MAX_METADATA_KEYS: Final = 16
MAX_METADATA_KEY_LENGTH: Final = 64
MAX_METADATA_VALUE_LENGTH: Final = 512
MAX_CONDITIONS: Final = 16
# Requests one job may hold: the ledger keeps 12 bytes of offsets per request in one Redis
# string, and Redis refuses a value over 512 MB (about 44.7M requests). Past this the job fails
# at indexing, saying so, instead of meeting Redis's error.
MAX_REQUESTS_PER_JOB: Final = 40_000_000
# Unfinished requests a namespace's jobs may hold in the ledger together unless its quota says
# otherwise: an indexed request costs about 30-45 bytes of Redis (bench.ledger), so this is about
# 225 MB of the ledger's 1.5 GB. One namespace's legitimate 40M-request job (1.3 GB) filled it.
DEFAULT_MAX_REQUESTS_PER_NAMESPACE: Final = 5_000_000
# A longer input line is not kept (it becomes an error line): reading holds at most this much of
# one line, whatever the input looks like (a file without newlines included). The ledger refuses
# a request span longer than this too (a tenant can write its job's spans).
MAX_LINE_BYTES: Final = 4 << 20

# vLLM's HTTP server closes idle keep-alive connections after 5 s by default; on a busy host its
# event loop can stall past that and close a connection a request was just sent on ("Server
# disconnected"). Engines troughfill starts get this longer timeout, and clients retire idle
# connections well before it (at half); engines it only attaches to may keep vLLM's 5 s.
ENGINE_KEEP_ALIVE_SECONDS: Final = 60
CLIENT_KEEP_ALIVE_SECONDS: Final = ENGINE_KEEP_ALIVE_SECONDS / 2
ATTACHED_ENGINE_CLIENT_KEEP_ALIVE_SECONDS: Final = 2.0

# An S3-protocol call that gets no answer (a store partitioned away or frozen accepts the
# connection and says nothing) fails after this long, tried this many times in all, instead of
# botocore's 60 s and five tries: the worker notices, keeps its leases and tries again later.
# A socket read, not a whole transfer: large objects stream in parts well inside it.
STORE_TIMEOUT_SECONDS: Final = 20
STORE_MAX_ATTEMPTS: Final = 3

# In a worker pod's engine command, replaced by the port the worker picked (`--engine-port auto`).
ENGINE_PORT_PLACEHOLDER: Final = "{engine_port}"

# The operator runs Python's full garbage collection itself, this often, right after a pool
# cycle (troughfill.collection): automatic ones landed inside cycles and made them the slowest.
FULL_COLLECTION_SECONDS: Final = 60.0

# Operator replicas' peering priority counts down from here in milliseconds of start time
# (2**42 ms is in the year 2109); times 1000 it stays below 2**53, exact in any JSON reader.
PEERING_SENIORITY_EPOCH_MILLIS: Final = 2**42

# Condition messages carry an upstream error's text (a query's, an API server's); the API allows
# 32768 characters, a reader wants one screen.
CONDITION_MESSAGE_MAX: Final = 1024
