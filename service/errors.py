"""Domain errors: what went wrong, in the service's own terms, with no HTTP in them.

Every module under `service/` raises these; `service/api/errors.py` is the one place that turns
them into HTTP (status, `Retry-After`, the JSON body `{"error": {"type", "message", "index"?}}`).
The class says what kind of failure it is; `code` is the stable machine-readable type the API
shows (`labelset_not_found`, `too_many_images`, ...); `message` is a sentence for a person;
`index` names the item of a batch at fault; `retry_after_s` tells a caller when to come back.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every failure a caller should see."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        index: int | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.index = index
        self.retry_after_s = retry_after_s

    def at(self, index: int, message: str) -> ServiceError:
        """The same failure, about item `index` of a larger request (e.g. one image among items)."""
        return type(self)(message, code=self.code, index=index, retry_after_s=self.retry_after_s)


class InvalidInput(ServiceError):
    """The request is well-formed JSON but asks for something invalid."""

    code = "invalid_request"


class InvalidImage(ServiceError):
    """Bytes that are not a decodable image, or an image reference that cannot be fetched."""

    code = "invalid_image"


class TooLarge(ServiceError):
    """Over one of this server's size limits (items per request, characters, pixels)."""

    code = "too_large"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    """The target exists but is in a state that refuses the request (building, other model...)."""

    code = "conflict"


class Overloaded(ServiceError):
    """A queue is full: retry after `retry_after_s`."""

    code = "overloaded"


class Unavailable(ServiceError):
    """Not ready, shutting down, or a store that cannot be reached: retry later."""

    code = "unavailable"


class TimedOut(Unavailable):
    code = "timeout"


class ClientGone(ServiceError):
    """The client closed the connection before the answer was ready."""

    code = "client_closed"


class InferenceFailed(ServiceError):
    """The model itself failed on a batch: a defect of the model or the server, never the caller's."""

    code = "inference_error"
