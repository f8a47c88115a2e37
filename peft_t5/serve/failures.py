"""Why a generation request did not finish, and the HTTP answer each reason gets."""
from __future__ import annotations

import asyncio

from .schemas import ApiError


class AdapterGone(LookupError):
    """An adapter was unloaded between accepting a request and generating for it."""


class DeadlineExceeded(TimeoutError):
    """A request ran past the server's --request_timeout; its rows were dropped."""


class Busy(RuntimeError):
    """The server's queue is full: the request was not accepted."""


class TooLarge(ValueError):
    """A request asks for more rows at once (samples or beams of one input) than the server gives a request."""


class ClientGone(ConnectionError):
    """The client closed its connection before its answer was ready: its rows were dropped."""


class Stopping(RuntimeError):
    """The server is shutting down: the request was not run."""


async def while_connected(request, work):
    """work's result, unless the client hangs up first: then work is cancelled (the engine drops its rows at its
    next step) and ClientGone raised. Starlette notices a hang-up only for streams; a plain reply is awaited here
    beside the ASGI receive, which answers http.disconnect once the client has gone."""
    async def hang_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone("the client closed the connection before the answer")
    return task.result()


def api_error(e: Exception) -> ApiError | None:
    """The reply for a request that failed with e; None for a bug (answered 500)."""
    if isinstance(e, AdapterGone):
        return ApiError(404, str(e), "adapter")
    if isinstance(e, DeadlineExceeded):
        return ApiError(504, f"{e}, this server's --request_timeout; send fewer inputs or a lower max_new_tokens")
    if isinstance(e, Busy):
        return ApiError(503, f"the server is busy: {e}")
    if isinstance(e, Stopping):
        return ApiError(503, f"the server is stopping: {e}; retry on another server or once it is back")
    if isinstance(e, TooLarge):
        return ApiError(422, f"n: {e}; ask for fewer", "n")
    if isinstance(e, ClientGone):
        return ApiError(499, str(e))  # nginx's "client closed request": nobody reads it, /metrics counts it
    return None


SENT_WHOLE = "peft_t5.stream_sent_whole"  # set in the request's scope once a stream's last event is handed over


async def marked_when_whole(request, events):
    """A stream's events; once the last one is sent, the request's scope says so (the server's metrics count a
    stream its client left before that as 499, as a plain reply)."""
    async for event in events:
        yield event
    request.scope[SENT_WHOLE] = True
