"""The troughfill.io/v1alpha1 API: pydantic models that are the single source of truth for the CRDs."""

from troughfill.api.admission import Admission, admit
from troughfill.api.base import ApiModel, Rule, immutable_changes
from troughfill.api.batchinference import (
    BatchInference,
    BatchInferenceSpec,
    BatchInferenceStatus,
    Endpoint,
    Phase,
)
from troughfill.api.batchpool import BatchPool, BatchPoolSpec, BatchPoolStatus
from troughfill.api.conditions import Condition, ConditionStatus, JobConditionType, Reason
from troughfill.api.modeltemplate import ModelTemplate, ModelTemplateSpec, ModelTemplateStatus
from troughfill.api.resource import Resource

RESOURCES: tuple[type[Resource], ...] = (BatchInference, BatchPool, ModelTemplate)

__all__ = [
    "RESOURCES",
    "Admission",
    "ApiModel",
    "BatchInference",
    "BatchInferenceSpec",
    "BatchInferenceStatus",
    "BatchPool",
    "BatchPoolSpec",
    "BatchPoolStatus",
    "Condition",
    "ConditionStatus",
    "Endpoint",
    "JobConditionType",
    "ModelTemplate",
    "ModelTemplateSpec",
    "ModelTemplateStatus",
    "Phase",
    "Reason",
    "Resource",
    "Rule",
    "admit",
    "immutable_changes",
]
