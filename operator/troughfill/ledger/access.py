"""Redis users for workers: one per job, able to touch that job's keys and nothing else.

The operator connects with its own (admin) credentials. For each job it makes the ACL user
`troughfill-job-<uid>`, whose key pattern is the job's prefix (`troughfill:{ns/name/uid}:*`)
and whose commands are the data commands and EVALSHA: no EVAL or SCRIPT LOAD (a tenant could
otherwise run a script that stalls every job), no SCAN, KEYS or RANDOMKEY (other jobs' names),
no Pub/Sub, nothing administrative. Inside a script Redis checks every command and key against
the same user, so the job's own scripts cannot be pointed at another job's keys either.

A job user's password is an HMAC of its uid under a key kept in Redis (only the operator's
user can read it), so it is the same after an operator restart and nothing else must be
stored. Users live in Redis's memory: after a Redis restart (a new run_id) the operator makes
them again, and loads the scripts workers may run.
"""

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from redis.asyncio import Redis

from troughfill import constants
from troughfill.ledger import lua
from troughfill.ledger.keys import JobKeys

ACCESS_KEY = f"{constants.REDIS_KEY_PREFIX}:ledger-access-key"
USER_PREFIX = "troughfill-job-"
SCRIPTS = (
    "CLAIM",
    "RENEW",
    "RELEASE",
    "NACK",
    "REAP",
    "COMMIT",
    "TRANSITION",
    "CLOSE",
    "SAVE_PARTIALS",
    "PROGRESS_MANY",
)
CATEGORY_RULES = (
    "-@all",
    "+@read",
    "+@write",
    "+@connection",
    "-@dangerous",
    "-@admin",
    "-@scripting",
    "-@pubsub",
    "-@blocking",
)
COMMAND_RULES = ("+time", "-scan", "-randomkey", "-dbsize", "+evalsha", "+evalsha_ro")
"""Applied after the categories, in this order."""


def username(keys: JobKeys) -> str:
    return f"{USER_PREFIX}{keys.uid}"


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def key_pattern(keys: JobKeys) -> str:
    return f"~{_glob_escape(keys.prefix)}*"


class LedgerAccess:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._key: bytes | None = None
        self._run_id: str | None = None
        """The Redis run_id the scripts were loaded into and `_granted` made on."""
        self._granted: set[JobKeys] = set()

    async def _access_key(self) -> bytes:
        if self._key is None:
            await self.client.set(ACCESS_KEY, secrets.token_hex(32), nx=True)
            stored = await self.client.get(ACCESS_KEY)
            self._key = stored if isinstance(stored, bytes) else str(stored).encode()
        return self._key

    async def credentials(self, keys: JobKeys) -> tuple[str, str]:
        """(username, password) of the job's worker user."""
        digest = hmac.new(await self._access_key(), keys.uid.encode(), hashlib.sha256).hexdigest()
        return username(keys), digest

    async def grant(self, keys: JobKeys) -> tuple[str, str]:
        """Make (or remake) the job's worker user; its credentials."""
        name, password = await self.credentials(keys)
        self._granted.add(keys)
        await self.client.acl_setuser(
            name,
            enabled=True,
            passwords=[f"+{password}"],
            categories=CATEGORY_RULES,
            commands=COMMAND_RULES,
            keys=[key_pattern(keys)],
            reset=True,
            reset_keys=True,
            reset_channels=True,
            reset_passwords=True,
        )
        return name, password

    async def revoke(self, keys: JobKeys) -> None:
        """Remove the job's worker user (its connections are closed by Redis)."""
        self._granted.discard(keys)
        await self.client.acl_deluser(username(keys))

    async def load_scripts(self) -> None:
        """Load the scripts workers run by EVALSHA (they may not load any)."""
        for name in SCRIPTS:
            await self.client.script_load(getattr(lua, name))

    async def ensure(self, jobs: Iterable[JobKeys]) -> int:
        """Every running job's user exists on the Redis of now: after a Redis restart (a new
        run_id) the scripts are loaded and the users made again, and a job this operator has
        not granted yet (its first cycle, another pool's job) gets its user. How many it made."""
        run_id = str((await self.client.info("server")).get("run_id", ""))
        if run_id != self._run_id:
            self._key = None  # a Redis that lost its data lost the key too
            self._granted = set()
            await self.load_scripts()
            self._run_id = run_id
        missing = [keys for keys in jobs if keys not in self._granted]
        for keys in missing:
            await self.grant(keys)
        return len(missing)
