"""The bounds of a video call behind Ray (masquerade.scale.video), without a cluster: the Inbox's queues
hold at most their capacity, and a replica writes at most CREDIT messages ahead of the front end.

The Inbox is the real class; ``Local`` calls its methods as a Ray actor handle would (``x.method.remote(...)``
returning an awaitable), in one event loop instead of across processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from masquerade.api.protos import pb2
from masquerade.scale.video import ABORT, CREDIT, END, Inbox, ReplicaCall, credit_key, inbox_messages


class Local:
    """An object's methods called as ``handle.method.remote(*args)`` (a Ray actor handle's spelling)."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        method = getattr(self._target, name)

        class Remote:
            @staticmethod
            def remote(*args):
                result = method(*args)
                return result if asyncio.iscoroutine(result) else asyncio.sleep(0, result)

        return Remote


def test_a_full_queue_holds_the_sender_and_close_wakes_both_sides():
    async def scenario():
        inbox = Inbox()
        await inbox.open("k", 2)
        assert await inbox.put("k", 1) and await inbox.put("k", 2)
        third = asyncio.create_task(inbox.put("k", 3))
        await asyncio.sleep(0.05)
        assert not third.done()  # the queue is full: the front end stops reading the client
        assert await inbox.take("k") == [1, 2]
        assert await third
        assert await inbox.take("k") == [3]
        waiting = asyncio.create_task(inbox.take("k"))
        await asyncio.sleep(0.05)
        await inbox.close("k")
        assert await waiting == [ABORT]
        assert not await inbox.put("k", 4) and inbox.calls() == 0

    asyncio.run(scenario())


def test_the_replica_writes_at_most_credit_messages_ahead_of_the_front_end():
    async def scenario():
        inbox = Inbox()
        await inbox.open("k", 4)
        await inbox.open(credit_key("k"), CREDIT + 1)
        call = ReplicaCall(Local(inbox), "k", None, "peer")
        sent = []

        async def replica():
            for sequence in range(CREDIT + 3):
                await call.write(pb2.FrameResult(sequence=sequence))
                sent.append(sequence)

        writer = asyncio.create_task(replica())
        received = []
        for _ in range(CREDIT):  # the front end takes messages but gRPC has not taken them from it yet
            received.append(pb2.FrameResult.FromString((await call.outbox.get())[1]).sequence)
        await asyncio.sleep(0.1)
        assert len(sent) == CREDIT and not writer.done()  # stopped: no credit left
        await inbox.put(credit_key("k"), 1)  # gRPC took one: the replica may send one more
        received.append(pb2.FrameResult.FromString((await call.outbox.get())[1]).sequence)
        await asyncio.sleep(0.1)
        assert len(sent) == CREDIT + 1
        await inbox.close(credit_key("k"))  # the call ended: the replica's writer stops
        with pytest.raises(asyncio.CancelledError):
            await writer
        assert received == list(range(CREDIT + 1))

    asyncio.run(scenario())


def test_the_clients_messages_end_or_abort_the_replicas_reading():
    async def scenario():
        inbox = Inbox()
        await inbox.open("k", 4)
        start = pb2.AnonymizeVideoRequest(start=pb2.VideoStart(filename="a.mp4"))
        await inbox.put("k", ("message", start.SerializeToString()))
        await inbox.put("k", END)
        assert [m.start.filename async for m in inbox_messages(Local(inbox), "k", pb2.AnonymizeVideoRequest)] == [
            "a.mp4"
        ]
        await inbox.put("k", ABORT)
        with pytest.raises(asyncio.CancelledError):
            async for _ in inbox_messages(Local(inbox), "k", pb2.AnonymizeVideoRequest):
                pass
        call = ReplicaCall(Local(inbox), "k", 5.0, "peer")
        assert 0 < call.time_remaining() <= 5.0
        with pytest.raises(Exception, match="bad"):
            await call.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("k", b"v"),))
        assert call.outbox.get_nowait() == ("error", 3, "bad", (("k", b"v"),))

    asyncio.run(scenario())
