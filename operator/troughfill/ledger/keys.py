"""Where a job's state lives in Redis.

Every key of one job shares the Redis Cluster hash tag {namespace/name/uid}: the Lua
scripts touch several keys at once, which Redis Cluster allows only within one slot.
The uid keeps a deleted-and-recreated job (same name) from seeing the old one's state.
"""

from dataclasses import dataclass

from troughfill import constants
from troughfill.api.resource import ObjectMeta


@dataclass(frozen=True)
class JobKeys:
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, meta: ObjectMeta) -> "JobKeys":
        """The keys of the job these metadata describe (namespace, name and uid: a job deleted
        and created again under the same name has new keys)."""
        return cls(meta.ns, meta.name, meta.uid_text)

    @property
    def prefix(self) -> str:
        return f"{constants.REDIS_KEY_PREFIX}:{{{self.namespace}/{self.name}/{self.uid}}}:"

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    @property
    def script_keys(self) -> list[str]:
        """The fixed keys every ledger script gets, in the order the scripts name them."""
        return [self.key(name) for name in SCRIPT_KEY_NAMES]

    def lease(self, lease_id: int | str) -> str:
        return self.key(f"lease:{lease_id}")

    def segment_won(self, segment_id: str) -> str:
        return self.key(f"segwon:{segment_id}")


# meta: hash of the job's configuration and state; done: bitmap, one bit per request, set
# once when its result (or final error) is committed; retry: requests back from a lease;
# leases: zset lease id -> expiry; owners: lease id -> worker; attempts: request -> failed
# attempts; counters: aggregate counts and tokens; dead: request -> final error code;
# segments: committed segment ids in commit order; partial: request -> saved partial output;
# suspects: requests whose attempt a crash ended, each retried alone; crashes: request ->
# crashes that ended it while it ran alone; solo: lease ids that hold one suspect alone.
SCRIPT_KEY_NAMES = (
    "meta",
    "done",
    "retry",
    "leases",
    "owners",
    "attempts",
    "counters",
    "dead",
    "segments",
    "partial",
    "suspects",
    "crashes",
    "solo",
)
OFFSETS = "offsets"
"""Packed (start: uint64, length: uint32) per request: where its line is in the input."""
CUSTOM_IDS = "ids"
"""Prefix of the hashes `ids:<bucket>` of custom_id digests, only while indexing (duplicate
detection): 128-bit digests spread over enough buckets that each stays a compact listpack."""
