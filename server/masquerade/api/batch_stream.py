"""The AnonymizeBatch stream's multiplexing, shared by the single-process servicer and the Ray front end.

Requests are read as they arrive, run concurrently up to a window (backpressure: past it, gRPC flow
control slows the client), and answered in completion order, matched by ``request_id``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from masquerade.api.errors import code_number
from masquerade.api.protos import pb2


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
    without an id, or with the id of one still in flight, is refused here and reported to ``on_rejected``.
    """
    responses: asyncio.Queue[pb2.AnonymizeBatchResponse | None] = asyncio.Queue()
    window = asyncio.Semaphore(window_size)
    in_flight_ids: set[str] = set()
    tasks: set[asyncio.Task] = set()

    async def run_one(message: pb2.AnonymizeRequest) -> None:
        try:
            responses.put_nowait(await answer(message))
        finally:
            in_flight_ids.discard(message.request_id)
            window.release()

    async def read_requests() -> None:
        try:
            async for message in request_iterator:
                await window.acquire()
                request_id = message.request_id
                if not request_id or request_id in in_flight_ids:
                    window.release()
                    why = (
                        "is required in AnonymizeBatch"
                        if not request_id
                        else "duplicates a request still in flight on this stream"
                    )
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    on_rejected(message, code)
                    responses.put_nowait(
                        error_response(request_id, code, f"request_id: {why}; responses are matched by it")
                    )
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
        while (response := await responses.get()) is not None:
            await context.write(response)
        await reader  # surfaces a failure to read the request stream
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()  # cancelling an answer cancels its engine job
