"""ModelTemplate (cluster-scoped, admin-owned): the only way a user's job picks an image, model and GPUs."""

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from troughfill import constants
from troughfill.api.base import ApiModel, Rule, StatusModel, list_map, list_set
from troughfill.api.conditions import Condition
from troughfill.api.resource import CrdInfo, PrinterColumn, Resource, Scope
from troughfill.api.types import (
    ENGINE_ARG_VALUE_PATTERN,
    DnsSubdomain,
    EngineArgName,
    EnvVar,
    Labels,
    ResourceRequirements,
    Toleration,
)

# Flags that decide what model or code runs, where it is served, on which GPUs, or which files
# the engine reads. A template may set them in engine.args, but never hand them to users,
# whatever its allowlist says (the allowlist is what admits a flag; this list is a backstop).
RESERVED_ENGINE_ARGS: tuple[str, ...] = (
    "model",
    "tokenizer",
    "revision",
    "code-revision",
    "tokenizer-revision",
    "served-model-name",
    "host",
    "port",
    "uds",
    "root-path",
    "download-dir",
    "load-format",
    "config",
    "hf-overrides",
    "chat-template",
    "tool-parser-plugin",
    "middleware",
    "lora-modules",
    "prompt-adapters",
    "speculative-config",
    "allowed-local-media-path",
    "tensor-parallel-size",
    "pipeline-parallel-size",
    "data-parallel-size",
    "device",
    "trust-remote-code",
    "api-key",
    "ssl-keyfile",
    "ssl-certfile",
    "ssl-ca-certs",
)

EngineArgValue = Annotated[str, StringConstraints(max_length=256, pattern=ENGINE_ARG_VALUE_PATTERN)]
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_BOOLEANS = {"true": True, "false": False}


class EngineArgType(StrEnum):
    BOOLEAN = "Boolean"
    """"true" passes `--name`; "false" passes nothing (the engine's default)."""
    INTEGER = "Integer"
    NUMBER = "Number"
    ENUM = "Enum"
    STRING = "String"
    """Any value the pattern matches whole."""


class AllowedEngineArg(ApiModel):
    """An engine flag users may set in BatchInference.spec.engineArgs, and the values it takes."""

    name: EngineArgName
    type: EngineArgType
    minimum: float | None = None
    """Smallest value (Integer and Number)."""
    maximum: float | None = None
    """Largest value (Integer and Number)."""
    values: list[EngineArgValue] = list_set(max_length=64)
    """The values an Enum flag takes."""
    pattern: Annotated[str, StringConstraints(max_length=256)] | None = None
    """A regular expression a String flag's value must match whole."""

    rules = (
        Rule(
            cel="(self.type == 'Enum') == (has(self.values) && size(self.values) > 0)",
            message="values must be given for type Enum, and only for it",
            holds=lambda a: (a.type == EngineArgType.ENUM) == bool(a.values),
        ),
        Rule(
            cel="(self.type == 'String') == has(self.pattern)",
            message="pattern must be given for type String, and only for it",
            holds=lambda a: (a.type == EngineArgType.STRING) == (a.pattern is not None),
        ),
        Rule(
            cel="self.type in ['Integer', 'Number'] || (!has(self.minimum) && !has(self.maximum))",
            message="minimum and maximum apply to types Integer and Number only",
            holds=lambda a: (
                a.type in (EngineArgType.INTEGER, EngineArgType.NUMBER)
                or (a.minimum is None and a.maximum is None)
            ),
        ),
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern is not a regular expression: {error}") from error
        return pattern

    def problem(self, value: str) -> str | None:
        """Why `value` is not one this flag takes (None: it is)."""
        kind = self.type
        if kind == EngineArgType.BOOLEAN:
            return None if value in _BOOLEANS else "must be true or false"
        if kind == EngineArgType.ENUM:
            return None if value in self.values else f"must be one of {', '.join(self.values)}"
        if kind == EngineArgType.STRING:
            return None if re.fullmatch(self.pattern or "", value) else f"must match {self.pattern}"
        shape = _INTEGER if kind == EngineArgType.INTEGER else _NUMBER
        if not shape.fullmatch(value):
            return f"must be {'an integer' if kind == EngineArgType.INTEGER else 'a number'}"
        if self.minimum is not None and float(value) < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.maximum is not None and float(value) > self.maximum:
            return f"must be at most {self.maximum:g}"
        return None

    def token(self, value: str) -> str | None:
        """The one command-line word for `value` (already checked), or None for a false Boolean."""
        if self.type == EngineArgType.BOOLEAN:
            return f"--{self.name}" if _BOOLEANS[value] else None
        return f"--{self.name}={value}"


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
    allowed_engine_args: list[AllowedEngineArg] = list_map("name", max_length=64)
    """Engine flags users may set in BatchInference.spec.engineArgs, each with its type."""
    cold_start_seconds: int = Field(default=120, ge=0, le=86_400)
    """Estimated time from pod creation to the first request served (image pull, load, warm-up)."""
    tokens_per_second: int | None = Field(default=None, ge=1)
    """Estimated generation throughput of one worker, for deadline and trough planning."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: Labels = Field(default_factory=dict)
    """Narrows the pool's nodes (e.g. a GPU product label)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    service_account_name: DnsSubdomain | None = None
    run_as_user: int = Field(default=1000, ge=1, le=2**31 - 1)
    """The user (and group) workers run as: never root (the restricted Pod Security Standard)."""

    rules = (
        Rule(
            cel="!has(self.allowedEngineArgs) || !self.allowedEngineArgs.exists(a, a.name in "
            + "["
            + ", ".join(f"'{a}'" for a in RESERVED_ENGINE_ARGS)
            + "])",
            message="allowedEngineArgs must not include flags that choose the model, port or devices: "
            + ", ".join(RESERVED_ENGINE_ARGS),
            holds=lambda t: not {a.name for a in t.allowed_engine_args} & set(RESERVED_ENGINE_ARGS),
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
