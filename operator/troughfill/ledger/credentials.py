"""Job credentials for the ledger service: what a job's workers present, good for that job alone.

A job's workers never hold a Redis credential. They call the ledger service (ledger.service)
with a token the operator puts in the job's Secret: the job's reference (namespace/name/uid) and
an HMAC of it under a key only the operator and the ledger service read (it lives in Redis,
which no tenant reaches). The service derives the job from the token, so a token names exactly
one job's operations and cannot be turned into another's; nothing per job is stored. Whoever
holds a job's Secret (the tenant, with `edit` in its namespace) can act as that job's worker and
nothing more: claim, commit and checkpoint that job's requests, within the service's checks.
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from redis.asyncio import Redis

from troughfill import constants
from troughfill.ledger.keys import JobKeys

ACCESS_KEY = f"{constants.REDIS_KEY_PREFIX}:ledger-access-key"
CONTEXT = b"troughfill-ledger-job-token-v1\x00"
"""Bound into every MAC, so the key signs nothing but job tokens."""
MAX_TOKEN_LENGTH = 512
_REF = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-f0-9-]{1,64}")
"""namespace (a DNS label) / name (a DNS subdomain) / uid: what JobKeys of a real job look like."""


def job_reference(keys: JobKeys) -> str:
    return f"{keys.namespace}/{keys.name}/{keys.uid}"


def _mac(key: bytes, reference: str) -> str:
    return hmac.new(key, CONTEXT + reference.encode(), hashlib.sha256).hexdigest()


def make_token(key: bytes, keys: JobKeys) -> str:
    reference = job_reference(keys)
    encoded = base64.urlsafe_b64encode(reference.encode()).decode().rstrip("=")
    return f"{encoded}.{_mac(key, reference)}"


def read_token(key: bytes, token: str) -> JobKeys | None:
    """The job a token is for, or None when it is not one `make_token` made under `key`."""
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        return None
    encoded, mac = token.split(".")
    try:
        reference = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not _REF.fullmatch(reference) or not hmac.compare_digest(_mac(key, reference), mac):
        return None
    namespace, name, uid = reference.split("/")
    return JobKeys(namespace, name, uid)


class LedgerKey:
    """The signing key, made once in Redis (by whichever of the operator and the service comes
    first) and read from there; a Redis that lost its data makes a new one (and lost every job's
    ledger with it)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._key: bytes | None = None

    async def get(self, *, fresh: bool = False) -> bytes:
        if self._key is None or fresh:
            await self.client.set(ACCESS_KEY, secrets.token_hex(32), nx=True)
            stored = await self.client.get(ACCESS_KEY)
            self._key = stored if isinstance(stored, bytes) else str(stored).encode()
        return self._key

    async def token(self, keys: JobKeys) -> str:
        """The token a job's workers present to the ledger service."""
        return make_token(await self.get(), keys)
