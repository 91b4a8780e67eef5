"""Small pieces every Kubernetes adapter shares: reading a Secret, wording an API error."""

import base64
import json

from kubernetes import client
from kubernetes.client.exceptions import ApiException


def secret_data(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's data, decoded (None: no such Secret). Blocking."""
    try:
        found = core.read_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return {key: base64.b64decode(value).decode() for key, value in (found.data or {}).items()}


def api_message(error: ApiException) -> str:
    """What the API server said (its Status message), else the HTTP status and reason."""
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = None
    return str(message) if message else f"{error.status} {error.reason}"
