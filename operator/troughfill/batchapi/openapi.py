"""The OpenAPI document of the Batch API (/openapi.json), from the same models the server answers with."""

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from troughfill import __version__
from troughfill.batchapi.wire import Batch, CreateBatch, ErrorResponse, FileDeleted, FileObject, Page

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "Invalid request",
    "401": "No token, or one the cluster does not accept",
    "403": "SubjectAccessReview denies the caller this in the namespace",
    "404": "No such object in the namespace",
    "429": "Over the caller's rate, or too many uploads at once; retry-after says when to try again",
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}


def _responses(ok: str, *extra: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": "OK", "content": content or _json(ok)}}
    for code, why in ERRORS.items():
        answers[code] = {"description": why, "content": _json("ErrorResponse")}
    for code in extra:
        answers[code] = {
            "description": {"409": "Conflict", "413": "Too large"}[code],
            "content": _json("ErrorResponse"),
        }
    answers["503"] = {"description": "The object store failed", "content": _json("ErrorResponse")}
    return answers


def _id(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


@cache
def document() -> dict[str, Any]:
    models = [
        (Batch, "serialization"),
        (CreateBatch, "validation"),
        (FileObject, "serialization"),
        (FileDeleted, "serialization"),
        (ErrorResponse, "serialization"),
        (Page[Batch], "serialization"),
        (Page[FileObject], "serialization"),
    ]
    _, schemas = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    components = schemas.get("$defs", {})
    components["BatchList"] = components.pop("Page_Batch_")
    components["FileList"] = components.pop("Page_FileObject_")
    after = _query("after", {"type": "string"})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "troughfill Batch API",
            "version": __version__,
            "description": "OpenAI's Batch and Files API over BatchInference custom resources.",
        },
        "security": [{"bearer": []}],
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A Kubernetes token"}
            },
        },
        "paths": {
            "/v1/files": {
                "post": {
                    "operationId": "createFile",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["purpose", "file"],
                                    "properties": {
                                        "purpose": {"type": "string", "enum": ["batch"]},
                                        "file": {"type": "string", "format": "binary"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("FileObject", "413"),
                },
                "get": {
                    "operationId": "listFiles",
                    "parameters": [
                        after,
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
                        _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                        _query("purpose", {"type": "string"}),
                    ],
                    "responses": _responses("FileList"),
                },
            },
            "/v1/files/{file_id}": {
                "get": {
                    "operationId": "retrieveFile",
                    "parameters": [_id("file_id")],
                    "responses": _responses("FileObject"),
                },
                "delete": {
                    "operationId": "deleteFile",
                    "parameters": [_id("file_id")],
                    "responses": _responses("FileDeleted"),
                },
            },
            "/v1/files/{file_id}/content": {
                "get": {
                    "operationId": "downloadFile",
                    "parameters": [_id("file_id")],
                    "responses": _responses(
                        "", content={"application/jsonl": {"schema": {"type": "string"}}}
                    ),
                }
            },
            "/v1/batches": {
                "post": {
                    "operationId": "createBatch",
                    "requestBody": {"required": True, "content": _json("CreateBatch")},
                    "responses": _responses("Batch"),
                },
                "get": {
                    "operationId": "listBatches",
                    "parameters": [after, _query("limit", {"type": "integer", "minimum": 1, "maximum": 100})],
                    "responses": _responses("BatchList"),
                },
            },
            "/v1/batches/{batch_id}": {
                "get": {
                    "operationId": "retrieveBatch",
                    "parameters": [_id("batch_id")],
                    "responses": _responses("Batch"),
                }
            },
            "/v1/batches/{batch_id}/cancel": {
                "post": {
                    "operationId": "cancelBatch",
                    "parameters": [_id("batch_id")],
                    "responses": _responses("Batch", "409"),
                }
            },
        },
    }
