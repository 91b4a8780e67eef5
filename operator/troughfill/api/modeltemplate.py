"""ModelTemplate (cluster-scoped, admin-owned): the only way a user's job picks an image, model and GPUs."""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from troughfill import constants
from troughfill.api.base import ApiModel, Rule, StatusModel, list_map, list_set
from troughfill.api.conditions import Condition
from troughfill.api.resource import CrdInfo, PrinterColumn, Resource, Scope
from troughfill.api.types import (
    DnsSubdomain,
    EngineArgName,
    EnvVar,
    Labels,
    ResourceRequirements,
    Toleration,
)

# Flags that decide what model runs, where it is served, or on which GPUs. A template may
# set them in engine.args, but never hand them to users, whatever its allowlist says.
RESERVED_ENGINE_ARGS: tuple[str, ...] = (
    "model",
    "tokenizer",
    "served-model-name",
    "host",
    "port",
    "download-dir",
    "load-format",
    "tensor-parallel-size",
    "pipeline-parallel-size",
    "device",
    "trust-remote-code",
    "api-key",
)

CommandPart = Annotated[str, StringConstraints(max_length=4096)]


class EngineSpec(ApiModel):
    """How the worker starts the inference engine beside itself."""

    command: list[CommandPart] = Field(
        default_factory=lambda: ["python", "-m", "vllm.entrypoints.openai.api_server"],
        min_length=1,
        max_length=16,
    )
    args: list[CommandPart] = Field(default_factory=list, max_length=128)
    """Engine flags the admin fixes; the model, name and port flags are added by the worker."""
    env: list[EnvVar] = list_map("name", max_length=64)
    port: int = Field(default=8000, ge=1, le=65535)


class ModelSource(ApiModel):
    uri: Annotated[str, StringConstraints(pattern=r"^([a-z][a-z0-9+.-]*://|/)\S+$", max_length=2048)]
    """Where the weights are: a path in the image or on a mounted volume, or a URI the engine can load."""
    served_model_name: Annotated[str, StringConstraints(pattern=r"^\S+$", max_length=256)]
    """The model name requests' bodies must use."""


class ModelTemplateSpec(ApiModel):
    pool_ref: DnsSubdomain
    """The BatchPool whose GPUs workers of this template run on."""
    image: Annotated[str, StringConstraints(pattern=r"^\S+$", max_length=512)]
    model: ModelSource
    gpus_per_worker: int = Field(default=1, ge=1, le=64, alias="gpusPerWorker")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    allowed_engine_args: list[EngineArgName] = list_set(max_length=64)
    """Engine flags users may set in BatchInference.spec.engineArgs."""
    cold_start_seconds: int = Field(default=120, ge=0, le=86_400)
    """Estimated time from pod creation to the first request served (image pull, load, warm-up)."""
    tokens_per_second: int | None = Field(default=None, ge=1)
    """Estimated generation throughput of one worker, for deadline and trough planning."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: Labels = Field(default_factory=dict)
    """Narrows the pool's nodes (e.g. a GPU product label)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    service_account_name: DnsSubdomain | None = None

    rules = (
        Rule(
            cel="!has(self.allowedEngineArgs) || !self.allowedEngineArgs.exists(a, a in "
            + "["
            + ", ".join(f"'{a}'" for a in RESERVED_ENGINE_ARGS)
            + "])",
            message="allowedEngineArgs must not include flags that choose the model, port or devices: "
            + ", ".join(RESERVED_ENGINE_ARGS),
            holds=lambda t: not set(t.allowed_engine_args) & set(RESERVED_ENGINE_ARGS),
        ),
    )


class ModelTemplateStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = list_map("type", max_length=constants.MAX_CONDITIONS)


class ModelTemplate(Resource):
    """An admin-approved model, image and GPU shape that BatchInferences refer to by name."""

    crd = CrdInfo(
        kind=constants.KIND_MODEL_TEMPLATE,
        plural="modeltemplates",
        singular="modeltemplate",
        scope=Scope.CLUSTER,
        short_names=("mt",),
        printer_columns=(
            PrinterColumn("Pool", ".spec.poolRef"),
            PrinterColumn("Model", ".spec.model.servedModelName"),
            PrinterColumn("GPUs", ".spec.gpusPerWorker", "integer", "GPUs per worker"),
            PrinterColumn("Image", ".spec.image", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["ModelTemplate"] = "ModelTemplate"
    spec: ModelTemplateSpec
    status: ModelTemplateStatus | None = None
