"""What went wrong with an object, where, and whether trying again may help.

Every ObjectStore operation raises StorageError (the cause chained): the message says what was
done to which URL, and `transient` whether the failure is of the kind that passes (a connection
refused, a timeout, a 5xx or throttling answer) or one that will not (no such object or bucket,
access denied, no credentials). Callers retry the first kind a bounded number of times and end
the job on the second.
"""

from troughfill.errors import TroughfillError

PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "ParamValidationError"})
TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ResponseStreamingError",
    }
)
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "Throttling", "ServiceUnavailable", "InternalError"}
)


def is_transient(error: BaseException) -> bool:
    """Whether trying the same again later may succeed."""
    name = type(error).__name__
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if name in PERMANENT_NAMES:
        return False
    if name in TRANSIENT_NAMES or isinstance(error, ConnectionError | TimeoutError):
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in TRANSIENT_CODES or status >= 500 or status in {408, 429}
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        return is_transient(cause)
    return isinstance(error, OSError)  # an I/O error of no known kind: worth a bounded retry


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:500]


class StorageError(TroughfillError):
    """An object-store operation failed."""

    def __init__(self, operation: str, url: str, cause: BaseException) -> None:
        self.operation = operation
        self.url = url
        self.transient = is_transient(cause)
        super().__init__(f"{operation} {url} failed: {describe(cause)}")


class ReadError(StorageError):
    """Reading an input or a segment failed."""


class WriteError(StorageError):
    """Writing (or deleting) under an output prefix failed."""
