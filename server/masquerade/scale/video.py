"""AnonymizeVideo and AnonymizeFrames behind ``--ray-replicas``: each call pinned to one engine replica.

A video call is a client stream whose state must stay in one place: a file is spooled on the
replica that runs its pipeline, and a live stream's tracker lives on the replica that covers its
frames. So, unlike images, a video call is one streaming handle call (``EngineReplica.video``),
which Ray's router sends to one replica for the call's whole life. Ray Serve handles carry
arguments, not streams, so the client's messages travel beside the call through an ``Inbox``:
one small Ray actor per front end holding a bounded queue per call. The replica runs the
single-process server's own ``VideoService`` on them (validation, spool, limits, window, errors,
access log), through ``ReplicaCall``, a stand-in for the gRPC context.

Bounds hold end to end, as on one process:

- client -> replica: a call's queue holds a few messages; when it is full the front end stops
  reading the client's stream (gRPC flow control then stops the client);
- replica -> client: the replica has at most ``CREDIT`` messages not yet written to the client
  (Serve's streaming has no back-pressure of its own); the front end returns a credit for each
  message once gRPC has taken it, so a client that stops reading stops the replica's output;
- a live stream has at most ``window`` frames between the front end reading them and gRPC taking
  their results, counted in the front end exactly as the single-process server counts them.

A replica that dies fails the calls it holds with UNAVAILABLE (the tracker and the spooled upload
die with it; the client reconnects or uploads again), as for images.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc

from masquerade.api.protos import pb2

CREDIT = 4
"""Replica messages (progress, output chunks, frame results) in flight to the front end per call."""
UPLOAD_QUEUE = 4
"""Client messages (a file's chunks, up to 64 MiB each but 1 MiB from the clients) queued per call."""

END = ("end",)
ABORT = ("abort",)


class _Box:
    __slots__ = ("items", "capacity", "closed", "changed")

    def __init__(self, capacity: int):
        self.items: deque = deque()
        self.capacity = capacity
        self.closed = False
        self.changed = asyncio.Condition()


class Inbox:
    """Ray actor: bounded queues, one per key (a call's client messages, and its credits).

    ``put`` waits while the queue is full; ``take`` waits for at least one item and returns all that
    wait. ``close`` wakes both sides: a closed queue takes nothing more and yields ABORT.
    """

    def __init__(self) -> None:
        self._boxes: dict[str, _Box] = {}

    async def open(self, key: str, capacity: int) -> None:
        self._boxes[key] = _Box(max(1, capacity))

    async def put(self, key: str, item: Any) -> bool:
        box = self._boxes.get(key)
        if box is None:
            return False
        async with box.changed:
            await box.changed.wait_for(lambda: box.closed or len(box.items) < box.capacity)
            if box.closed:
                return False
            box.items.append(item)
            box.changed.notify_all()
        return True

    async def take(self, key: str) -> list:
        box = self._boxes.get(key)
        if box is None:
            return [ABORT]
        async with box.changed:
            await box.changed.wait_for(lambda: box.closed or bool(box.items))
            if not box.items:
                return [ABORT]
            items = list(box.items)
            box.items.clear()
            box.changed.notify_all()
        return items

    async def close(self, *keys: str) -> None:
        for key in keys:
            box = self._boxes.pop(key, None)
            if box is not None:
                async with box.changed:
                    box.closed = True
                    box.changed.notify_all()

    def calls(self) -> int:
        """Queues open now (two per call): a test's check that every call cleaned up."""
        return len(self._boxes)


def credit_key(key: str) -> str:
    return f"{key}/credit"


# ---------------------------------------------------------------- replica side


class _Aborted(Exception):
    """ReplicaCall.abort: the handler has said its final status."""


class ReplicaCall:
    """What VideoService needs of a gRPC servicer context, on a replica: ``write`` sends a message to the
    front end (waiting for credit), ``abort`` sends the final status with its trailers (RetryInfo)."""

    def __init__(self, inbox, key: str, time_remaining_s: float | None, peer: str):
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._inbox = inbox
        self._credit_key = credit_key(key)
        self._deadline = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        self._peer = peer
        self._credit = CREDIT

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return {}

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def cancelled(self) -> bool:
        return False  # the front end cancels the handle call, which cancels the handler's task

    async def write(self, message) -> None:
        while self._credit == 0:
            returned = await self._inbox.take.remote(self._credit_key)
            if ABORT in returned:
                raise asyncio.CancelledError("the front end closed the call")
            self._credit += len(returned)
        self._credit -= 1
        await self.outbox.put(("message", message.SerializeToString()))

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:
        await self.outbox.put(("error", code.value[0], details, tuple(trailing_metadata or ())))
        raise _Aborted(details)


async def inbox_messages(inbox, key: str, message_type) -> AsyncIterator:
    """The client's messages of one call, as the front end put them in the inbox."""
    while True:
        for item in await inbox.take.remote(key):
            if item == END:
                return
            if item == ABORT:
                raise asyncio.CancelledError("the client's stream failed or the call was cancelled")
            yield message_type.FromString(item[1])


async def serve_on_replica(video_service, rpc: str, inbox, key: str, time_remaining_s, peer: str):
    """EngineReplica.video's body: runs ``rpc``'s VideoService handler on the inbox's messages and yields
    ("message", bytes) items, then at most one ("error", code, details, trailers) item."""
    from masquerade.api.errors import code_number, status_for

    call = ReplicaCall(inbox, key, time_remaining_s, peer)
    if rpc == "AnonymizeVideo":
        handler = video_service.anonymize_video(inbox_messages(inbox, key, pb2.AnonymizeVideoRequest), call)
    else:
        handler = video_service.anonymize_frames(inbox_messages(inbox, key, pb2.FrameRequest), call)

    async def run() -> None:
        try:
            await handler
        except _Aborted:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # what the handler did not map itself
            code, details = status_for(exc)
            await call.outbox.put(("error", code_number(code), details, ()))
        await call.outbox.put(None)

    task = asyncio.create_task(run(), name=f"{rpc}-{key}")
    try:
        while (item := await call.outbox.get()) is not None:
            yield item
        await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------- front end side


def frame_window(first: pb2.FrameRequest, max_frame_window: int, default: int) -> int:
    """The stream's window as the front end counts it (the replica checks the value and names a bad one)."""
    if first.HasField("options") and first.options.HasField("window"):
        return min(max(1, first.options.window), max_frame_window)
    return min(default, max_frame_window)
