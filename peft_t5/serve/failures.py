"""Why a generation request did not finish, and the HTTP answer each reason gets."""
from __future__ import annotations

from .schemas import ApiError


class AdapterGone(LookupError):
    """An adapter was unloaded between accepting a request and generating for it."""


class DeadlineExceeded(TimeoutError):
    """A request ran past the server's --request_timeout; its rows were dropped."""


class Busy(RuntimeError):
    """The server's queue is full: the request was not accepted."""


def api_error(e: Exception) -> ApiError | None:
    """The reply for a request that failed with e; None for a bug (answered 500)."""
    if isinstance(e, AdapterGone):
        return ApiError(404, str(e), "adapter")
    if isinstance(e, DeadlineExceeded):
        return ApiError(504, f"{e}, this server's --request_timeout; send fewer inputs or a lower max_new_tokens")
    if isinstance(e, Busy):
        return ApiError(503, f"the server is busy: {e}")
    return None
