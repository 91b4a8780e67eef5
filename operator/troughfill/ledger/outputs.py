"""Which live job writes to which output prefix: two never share one.

One Redis key per output prefix holds the job (namespace/name/uid) that writes there. A job
claims its prefix when it is admitted; a claim whose job has ended or is gone is taken over;
deleting the job releases it. Only the operator touches these keys (workers' Redis users
cannot reach them).
"""

import hashlib

from redis.asyncio import Redis

from troughfill import constants
from troughfill.ledger.keys import JobKeys
from troughfill.ledger.ledger import JobLedger
from troughfill.ledger.states import TERMINAL

# Replace (or delete, with an empty new value) the claim only if it is still `old`'s.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""
ATTEMPTS = 3


def job_ref(keys: JobKeys) -> str:
    return f"{keys.namespace}/{keys.name}/{keys.uid}"


class OutputClaims:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._swap = client.register_script(_SWAP)

    @staticmethod
    def key(prefix: str) -> str:
        digest = hashlib.sha256(prefix.encode()).hexdigest()
        return f"{constants.REDIS_KEY_PREFIX}:output:{digest}"

    async def claim(self, prefix: str, keys: JobKeys) -> JobKeys | None:
        """Claim `prefix` for the job; None when it holds it now, else the live job that does."""
        me, key = job_ref(keys), self.key(prefix)
        holder: JobKeys | None = None
        for _ in range(ATTEMPTS):
            if await self.client.set(key, me, nx=True):
                return None
            raw = await self.client.get(key)
            if raw is None:
                continue  # released just now: try again
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            if text == me:
                return None
            holder = JobKeys(*text.split("/", 2))
            if await self._alive(holder):
                return holder
            if await self._swap(keys=[key], args=[text, me]):
                return None
        return holder

    async def release(self, prefix: str, keys: JobKeys) -> None:
        await self._swap(keys=[self.key(prefix)], args=[job_ref(keys), ""])

    async def _alive(self, keys: JobKeys) -> bool:
        state = await JobLedger(self.client, keys).state()
        return state is not None and state not in TERMINAL
