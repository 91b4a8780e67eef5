"""Kopf peering (leader election between operator replicas), checked before Kopf starts.

Kopf pauses a replica whose peering CRD is missing and says why only at debug level, so an
install without the CRD looks healthy and does nothing; and a replica whose peering object is
missing never sees its peers, so two replicas would both act. `ensure_peering` turns the first
into an error that says what to do and creates the object when it is missing.
"""

from collections.abc import Sequence

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from troughfill.errors import TroughfillError

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERINGS = "clusterkopfpeerings"
NAMESPACED_PEERINGS = "kopfpeerings"


class PeeringUnavailableError(TroughfillError):
    """Leader election cannot work on this cluster as it is; the message says what to do."""


def ensure_peering(api: client.ApiClient, name: str, namespaces: Sequence[str] = ()) -> list[str]:
    """Check the peering CRD and create the peering object(s) where missing: one
    ClusterKopfPeering for a cluster-wide operator, a KopfPeering per namespace otherwise.
    Returns what was created (`kind/name` or `namespace/name`)."""
    plural = NAMESPACED_PEERINGS if namespaces else CLUSTER_PEERINGS
    crd = f"{plural}.{PEERING_GROUP}"
    try:
        client.ApiextensionsV1Api(api).read_custom_resource_definition(crd)
    except ApiException as error:
        if error.status == 404:
            raise PeeringUnavailableError(
                f"the peering CRD {crd} is not installed, so this replica could never tell whether "
                "another one is acting: apply manifests/crds (it installs it), or run a single "
                "replica with `troughfill operator --standalone`"
            ) from error
        raise PeeringUnavailableError(
            f"cannot read the peering CRD {crd}: {error.status} {error.reason}"
        ) from error
    custom = client.CustomObjectsApi(api)
    kind = "KopfPeering" if namespaces else "ClusterKopfPeering"
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": {"name": name}}
    created: list[str] = []
    targets: list[str | None] = list(namespaces) or [None]
    for namespace in targets:
        where = f"{namespace}/{name}" if namespace else name
        try:
            if namespace is None:
                custom.get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, plural, name)
            else:
                custom.get_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace, plural, name)
            continue  # there already: nothing to do (and no need to be allowed to create it)
        except ApiException as error:
            if error.status != 404:
                raise PeeringUnavailableError(
                    f"cannot read the peering object {kind} {where}: {error.status} {error.reason}"
                ) from error
        try:
            if namespace is None:
                custom.create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, plural, body)
            else:
                custom.create_namespaced_custom_object(
                    PEERING_GROUP, PEERING_VERSION, namespace, plural, body
                )
        except ApiException as error:
            if error.status != 409:  # another replica made it meanwhile: what we wanted
                raise PeeringUnavailableError(
                    f"cannot create the peering object {kind} {where}: {error.status} {error.reason}"
                ) from error
        created.append(f"{kind} {where}")
    return created
