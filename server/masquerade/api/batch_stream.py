"""The AnonymizeBatch stream's multiplexing, shared by the single-process servicer and the Ray front end.

Requests are read as they arrive, run concurrently up to a window, and answered in completion
order, matched by ``request_id``. Backpressure runs end to end (docs/design.md section 10): a
window slot is held from the moment a request is read until its response has been written to
the transport (grpc.aio's ``write`` returning), so a client that stops reading stops the server
reading its stream once ``window`` responses are waiting; gRPC's flow control then stalls the
client's sends. Nothing here grows with the number of requests a stream sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from masquerade.api.errors import code_number, status_for
from masquerade.api.protos import pb2

log = logging.getLogger(__name__)


def error_response(request_id: str, code: grpc.StatusCode, details: str) -> pb2.AnonymizeBatchResponse:
    return pb2.AnonymizeBatchResponse(request_id=request_id, error=pb2.Error(code=code_number(code), message=details))


async def serve_batch_stream(
    request_iterator: AsyncIterator[pb2.AnonymizeRequest],
    context: grpc.aio.ServicerContext,
    window_size: int,
    answer: Callable[[pb2.AnonymizeRequest], Awaitable[pb2.AnonymizeBatchResponse]],
    on_rejected: Callable[[pb2.AnonymizeRequest, grpc.StatusCode], None],
) -> None:
    """Runs ``answer`` for every request of the stream and writes its response.

    ``answer`` turns its own failures into error responses; only cancellation escapes it. A request
    without an id, or with the id of one whose response has not been written yet, is refused here
    and reported to ``on_rejected``.
    """
    # Every queued response holds a window slot, so the queue never holds more than the window;
    # the bound (+1 for the end marker) only makes that invariant explicit.
    responses: asyncio.Queue[tuple[pb2.AnonymizeBatchResponse, str | None] | None] = asyncio.Queue(window_size + 1)
    window = asyncio.Semaphore(window_size)
    in_flight_ids: set[str] = set()
    tasks: set[asyncio.Task] = set()

    async def run_one(message: pb2.AnonymizeRequest) -> None:
        try:
            response = await answer(message)
        except Exception as exc:  # a bug in ``answer``: the request still gets its answer and frees its slot
            code, details = status_for(exc, request_id=message.request_id)
            response = error_response(message.request_id, code, details)
        responses.put_nowait((response, message.request_id))  # never full: each entry holds a window slot

    async def read_requests() -> None:
        try:
            async for message in request_iterator:
                await window.acquire()
                request_id = message.request_id
                if not request_id or request_id in in_flight_ids:
                    why = (
                        "is required in AnonymizeBatch"
                        if not request_id
                        else "duplicates a request still in flight on this stream"
                    )
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    on_rejected(message, code)
                    response = error_response(request_id, code, f"request_id: {why}; responses are matched by it")
                    responses.put_nowait((response, None))
                    continue
                in_flight_ids.add(request_id)
                task = asyncio.create_task(run_one(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read_requests())
    try:
        while (item := await responses.get()) is not None:
            response, request_id = item
            try:
                await context.write(response)  # returns once gRPC has taken the bytes (flow control permitting)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A client's cancel can fail the write before it reaches this task. Give it a moment to
                # arrive (it cancels this task: the quiet, expected ending); a write that failed for any
                # other reason is a real failure and is raised.
                await asyncio.sleep(0.1)
                if not getattr(context, "cancelled", lambda: False)():
                    raise
                log.info("AnonymizeBatch: the client cancelled under a write (%s)", type(exc).__name__)
                return
            finally:
                if request_id is not None:
                    in_flight_ids.discard(request_id)
                window.release()
        await reader  # surfaces a failure to read the request stream
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()  # cancelling an answer cancels its engine job
