"""The base every API model stands on, and the markers the CRD generator reads.

Each validation is declared once and enforced twice: the API server enforces the CEL
form (Kubernetes >= 1.25), pydantic enforces the Python form (the operator re-checks every
object it reads, because older clusters ignore CEL). A `Rule` holds both side by side so
they are reviewed together, and a test evaluates the CEL with a real CEL interpreter
against the same table of objects as the Python form.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

JsonDict = dict[str, Any]

# Schema keys that only the generator reads; they never reach a CRD.
IMMUTABLE_KEY = "x-troughfill-immutable"
LATCH_KEY = "x-troughfill-latch"
LIST_TYPE_KEY = "x-kubernetes-list-type"
LIST_MAP_KEYS_KEY = "x-kubernetes-list-map-keys"
VALIDATIONS_KEY = "x-kubernetes-validations"


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, as CEL for the API server and as Python for pydantic.

    `cel` sees the object as the API server stores it (camelCase keys, defaults applied);
    `holds` sees the pydantic model. Both must accept and reject the same objects.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool]


def _add_rules_to_schema(schema: JsonDict, cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "rules", ())
    if rules:
        schema[VALIDATIONS_KEY] = [{"rule": rule.cel, "message": rule.message} for rule in rules]


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields rejected, docstrings become `kubectl explain` text."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_add_rules_to_schema,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _enforce_rules(self) -> Self:
        for name, field in type(self).model_fields.items():
            keys = _list_map_keys(field.json_schema_extra)
            if keys:
                _reject_duplicate_list_map_keys(field.alias or name, getattr(self, name), keys)
        for rule in type(self).rules:
            if not rule.holds(self):
                raise ValueError(rule.message)
        return self

    def to_wire(self) -> JsonDict:
        """The object as Kubernetes stores it: camelCase, JSON types, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status is written by the operator; a newer operator's extra fields must not break an older one."""

    model_config = ConfigDict(extra="ignore")


def _list_map_keys(extra: object) -> list[str]:
    if isinstance(extra, Mapping) and extra.get(LIST_TYPE_KEY) == "map":
        return list(extra[LIST_MAP_KEYS_KEY])
    return []


def _reject_duplicate_list_map_keys(field: str, items: list[Any], keys: list[str]) -> None:
    seen: set[tuple[Any, ...]] = set()
    for item in items:
        key = tuple(getattr(item, attribute_for_alias(type(item), k)) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
            raise ValueError(f"{field} has more than one entry with {shown}")
        seen.add(key)


def attribute_for_alias(model: type[BaseModel], alias: str) -> str:
    """The Python attribute behind a wire (camelCase) field name."""
    for name, field in model.model_fields.items():
        if (field.alias or name) == alias:
            return name
    raise KeyError(alias)


def immutable(default: Any = ..., *, json_schema_extra: JsonDict | None = None, **kwargs: Any) -> Any:
    """A field that cannot change once the object exists (CEL transition rule + `immutable_changes`)."""
    return Field(default, json_schema_extra={IMMUTABLE_KEY: True, **(json_schema_extra or {})}, **kwargs)


def latch(**kwargs: Any) -> Any:
    """A boolean that, once true, stays true (CEL transition rule + `immutable_changes`)."""
    return Field(False, json_schema_extra={LATCH_KEY: True}, **kwargs)


def list_map(*keys: str, **kwargs: Any) -> Any:
    """A list whose entries are identified by `keys` (server-side merge, uniqueness enforced)."""
    return Field(
        default_factory=list,
        json_schema_extra={LIST_TYPE_KEY: "map", LIST_MAP_KEYS_KEY: list(keys)},
        **kwargs,
    )


def list_set(**kwargs: Any) -> Any:
    """A list of unique scalars (Kubernetes forbids uniqueItems; it has list-type set instead)."""
    return Field(default_factory=list, json_schema_extra={LIST_TYPE_KEY: "set"}, **kwargs)


def immutable_changes(old: ApiModel, new: ApiModel) -> list[str]:
    """Wire names of immutable fields that differ between two versions of a spec, and of
    latches set back to false.

    The Python twin of the `self == oldSelf` and `self || !oldSelf` rules; needed because
    clusters without CEL accept such updates, and the operator must then refuse to act on them.
    """
    changed = []
    for name, field in type(new).model_fields.items():
        extra = field.json_schema_extra
        if not isinstance(extra, Mapping):
            continue
        before, after = getattr(old, name), getattr(new, name)
        if (extra.get(IMMUTABLE_KEY) and before != after) or (extra.get(LATCH_KEY) and before and not after):
            changed.append(field.alias or name)
    return changed
