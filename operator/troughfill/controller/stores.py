"""Each job's object store, with the credentials of the storage grant that admits it.

A grant names a Secret in the operator's namespace; the operator reads it (and nothing else of
anyone's Secrets) for the job's own reads and writes, and its workers get a copy in a Secret of
their own (kube.workerpod.job_secret). A grant without a Secret means the operator's and the
pods' own identity. Read Secrets are kept a minute, so a rotated key is picked up soon.
"""

import time
from collections.abc import Callable

from troughfill.api.admission import Admission
from troughfill.config import Settings
from troughfill.controller.ports import Secrets
from troughfill.errors import TroughfillError
from troughfill.storage import ObjectStore, store_for
from troughfill.storage.objects import STORAGE_SECRET_KEYS

SECRET_CACHE_SECONDS = 60.0


class GrantSecretMissingError(TroughfillError):
    """A storage grant names a Secret the operator's namespace does not have."""


class JobStores:
    """Object stores with a grant's credentials, for the operator and for the Batch API (both
    read grant Secrets in the operator's namespace, `settings.namespace`)."""

    def __init__(
        self, secrets: Secrets, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.secrets = secrets
        self.settings = settings
        self.clock = clock
        self._read: dict[str, tuple[float, dict[str, str]]] = {}

    def credentials(self, secret_name: str | None) -> dict[str, str]:
        """The storage keys of a grant's Secret ({} for a grant without one). Blocking."""
        if secret_name is None:
            return {}
        cached = self._read.get(secret_name)
        if cached is not None and self.clock() - cached[0] < SECRET_CACHE_SECONDS:
            return cached[1]
        data = self.secrets.secret_data(self.settings.namespace, secret_name)
        if data is None:
            raise GrantSecretMissingError(
                f"storage grant Secret {secret_name!r} not found in namespace {self.settings.namespace!r}"
            )
        keys = {key: value for key, value in data.items() if key in STORAGE_SECRET_KEYS}
        self._read[secret_name] = (self.clock(), keys)
        return keys

    def for_grant(self, secret_name: str | None) -> ObjectStore:
        """The store with a grant's credentials (its Secret's, or the own identity's). Blocking."""
        return store_for(self.settings, self.credentials(secret_name) or None)

    def for_admission(self, admission: Admission) -> ObjectStore | None:
        """The store for a job this admission allows (None: nothing admits it now). Blocking."""
        if not admission.allowed or admission.storage is None:
            return None
        return self.for_grant(admission.storage.secret_name)
