"""Storage grants: which URLs a namespace's jobs may read and write (pure).

A grant is a prefix ending in "/"; a URL is under it when it starts with it. URLs are taken
literally, so a URL that a filesystem or an object store would read differently from how it
is written (`.` and `..` segments, empty segments, percent-escapes in file paths, relative
file paths) is refused before any grant is consulted.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from troughfill.api.batchpool import StorageAccess, StorageGrant
from troughfill.constants import SEGMENTS_DIR

NAMESPACE_PLACEHOLDER = "{namespace}"


def url_problem(url: str) -> str | None:
    """Why the URL cannot be checked against grants as written (None: it can)."""
    scheme, _, path = url.partition("://")
    if scheme == "file":
        if not path.startswith("/"):
            return "is not an absolute file URL (file:///...)"
        if "%" in path:
            return "has a percent-escape"
        path = path[1:]
    segments = path.split("/")
    body = segments[:-1] if segments[-1] == "" else segments  # a trailing "/" is a prefix's
    if any(segment in {".", ".."} for segment in body):
        return "has a . or .. segment"
    if "" in body:
        return "has an empty segment (//)"
    return None


def as_prefix(url: str) -> str:
    """The output prefix a job writes under, as grants and other jobs compare it."""
    return url.rstrip("/") + "/"


@dataclass(frozen=True)
class Granted:
    """The grants a job's input and output fall under."""

    input: StorageGrant
    output: StorageGrant

    @property
    def secret_name(self) -> str | None:
        return self.output.secret_name


def effective(grants: Sequence[StorageGrant], namespace: str) -> list[StorageGrant]:
    """The grants with {namespace} replaced by the job's namespace, in prefixes and Secrets' names."""
    return [
        StorageGrant(
            prefix=grant.prefix.replace(NAMESPACE_PLACEHOLDER, namespace),
            access=grant.access,
            secret_name=grant.secret_name.replace(NAMESPACE_PLACEHOLDER, namespace)
            if grant.secret_name
            else None,
        )
        for grant in grants
    ]


def find_grants(grants: list[StorageGrant], input_url: str, output_url: str) -> Granted | str:
    """The grants covering the job's input (read) and output (write), or why there are none.

    The message names the job's own URLs and its own namespace's grants, nothing of anyone else's.
    """
    for field, url in (("inputURL", input_url), ("outputURL", output_url)):
        problem = url_problem(url)
        if problem:
            return f"{field} {url} {problem}"
    output = as_prefix(output_url)
    if SEGMENTS_DIR in output.split("/"):
        return f"outputURL {output_url} is inside a {SEGMENTS_DIR} directory, which troughfill reserves"
    readable = [g for g in grants if input_url.startswith(g.prefix)]
    writable = [g for g in grants if output.startswith(g.prefix) and g.access == StorageAccess.READ_WRITE]
    shown = ", ".join(f"{g.prefix} ({g.access.value})" for g in grants) or "none"
    if not readable:
        return f"inputURL {input_url} is not under a prefix granted to this namespace (granted: {shown})"
    if not writable:
        return f"outputURL {output_url} is not under a prefix this namespace may write to (granted: {shown})"
    for write in writable:
        for read in readable:
            if read.secret_name == write.secret_name:
                return Granted(read, write)
    return (
        f"inputURL and outputURL are granted with different credentials (Secrets "
        f"{readable[0].secret_name or '(none)'} and {writable[0].secret_name or '(none)'}): "
        "a job's workers get one set; put both under prefixes of one Secret"
    )
