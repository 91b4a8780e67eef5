"""The Batch API served on a loopback port from a thread, with in-memory cluster fakes."""

import asyncio
import base64
import copy
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from troughfill.api.batchpool import StorageGrant
from troughfill.batchapi.ports import Caller, Conflict, Rejected
from troughfill.batchapi.server import BatchApi
from troughfill_dev.localcluster.services import LOOPBACK, free_port


@dataclass
class FakeReviews:
    """Tokens and what each user may do where: {(user, namespace): {verbs}}."""

    tokens: dict[str, Caller] = field(default_factory=dict)
    grants: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def authenticate(self, token: str) -> Caller | Rejected:
        return self.tokens.get(token) or Rejected("[invalid bearer token, token lookup failed]")

    def allowed(self, caller: Caller, namespace: str, verb: str) -> bool:
        return verb in self.grants.get((caller.username, namespace), set())


@dataclass
class FakeJobs:
    """BatchInferences by (namespace, name), each namespace's storage grants and default template."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    storage: dict[str, list[StorageGrant]] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    secret_reads: int = 0
    grant_lookups: int = 0

    def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        if (namespace, name) in self.objects:
            raise Conflict(f'batchinferences "{name}" already exists')
        made = copy.deepcopy(manifest)
        made["metadata"] |= {
            "uid": str(uuid.uuid4()),
            "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "generation": 1,
        }
        self.objects[(namespace, name)] = made
        return copy.deepcopy(made)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def in_namespace(self, namespace: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (ns, _), o in sorted(self.objects.items()) if ns == namespace]

    def cancel(self, namespace: str, name: str, requested_at: int) -> dict[str, Any] | None:
        found = self.objects.get((namespace, name))
        if found is None:
            return None
        found["spec"]["cancel"] = True
        found["metadata"].setdefault("annotations", {})["troughfill.io/cancel-requested-at"] = str(
            requested_at
        )
        return copy.deepcopy(found)

    def default_template(self, namespace: str) -> str | None:
        return self.templates.get(namespace)

    def grants(self, namespace: str) -> list[StorageGrant]:
        self.grant_lookups += 1
        return list(self.storage.get(namespace, []))

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.secret_reads += 1
        found = self.secrets.get((namespace, name))
        return dict(found) if found is not None else None

    def set_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """What the operator would write."""
        self.objects[(namespace, name)]["status"] = status


@contextmanager
def serving(api: BatchApi) -> Iterator[str]:
    """The API's base URL while it runs on a loopback port in a thread of its own."""
    port = free_port()
    started = threading.Event()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(api.app())

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, LOOPBACK, port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="batch-api", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the Batch API did not start")
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def resigned(token: str, key_pem: bytes, shift_seconds: int) -> str:
    """A ServiceAccount token with its times moved by `shift_seconds`, signed again with the
    cluster's own ServiceAccount key: what an expired token looks like (shift < 0), or, with
    no shift, proof that the re-signing itself is accepted."""
    header, payload, _ = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for claim in ("iat", "nbf", "exp"):
        if claim in claims:
            claims[claim] += shift_seconds
    signed = f"{header}.{_b64url(json.dumps(claims).encode())}"
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return f"{signed}.{_b64url(key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256()))}"
