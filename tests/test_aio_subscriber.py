"""persizmq.aio.AsyncSubscriber over real zmq.asyncio sockets: delivery, batching, errors, aclose.

Most tests use PUSH/PULL over inproc (no slow joiner: what is sent before the subscriber runs
is waiting in the pipe, so a whole batch is there at its first wake-up); the socket-type test
beats PUB/SUB's slow joiner by publishing until something arrives. Conditions are polled with
deadlines; every test runs under a hang guard (``run``).
"""

import asyncio
import contextlib
import logging
import pathlib
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, List, Tuple

import pytest
import zmq
import zmq.asyncio

import persizmq
from persizmq.aio import AsyncSubscriber
from tests._aio_support import NotifyingStorage, run, until, within

Pair = Tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]


@contextlib.asynccontextmanager
async def pipe(
    receive_type: int = zmq.PULL, send_type: int = zmq.PUSH
) -> AsyncIterator[Tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]:
    """A bound receiving socket and a connected sending one, closed with linger 0 afterwards."""
    context = zmq.asyncio.Context()
    receiver = context.socket(receive_type)
    sender = context.socket(send_type)
    try:
        for sock in (receiver, sender):
            sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"inproc://aio-{uuid.uuid4().hex}"
        receiver.bind(endpoint)
        sender.connect(endpoint)
        yield receiver, sender
    finally:
        receiver.close(linger=0)
        sender.close(linger=0)
        context.term()


def messages(count: int) -> List[bytes]:
    return [b"message %d" % index for index in range(count)]


def send_all(sender: zmq.asyncio.Socket, msgs: List[Any]) -> None:
    """Queue ``msgs`` on ``sender`` without yielding to the loop (inproc never blocks here)."""
    shadow: zmq.Socket[Any] = zmq.Socket.shadow(sender.underlying)
    for msg in msgs:
        if isinstance(msg, list):
            shadow.send_multipart(msg)
        else:
            shadow.send(msg)


def test_every_message_arrives_whole_in_order_and_is_counted() -> None:
    sent: List[Any] = [*messages(400), [b"topic", b"body"], b"", [b"a", b"", b"c"]]

    async def body() -> None:
        async with pipe() as (pull, push):
            got: List[object] = []
            send_all(push, sent)
            async with AsyncSubscriber(pull, got.append) as sub:
                await until(lambda: len(got) == len(sent))
                assert sub.received == len(sent)
                assert sub.errors == 0
                assert sub.operational
                assert repr(sub).startswith("<AsyncSubscriber running received=")
            assert got == sent
            assert not sub.operational
            assert repr(sub).startswith("<AsyncSubscriber stopped")

            lists: List[object] = []
            send_all(push, [b"one", [b"two", b"frames"]])
            async with AsyncSubscriber(pull, lists.append, multipart=True) as sub:
                assert sub.multipart
                await until(lambda: len(lists) == 2)
            assert lists == [[b"one"], [b"two", b"frames"]]

    run(body)


def test_a_coroutine_callback_is_awaited_message_by_message() -> None:
    async def body() -> None:
        async with pipe() as (pull, push):
            got: List[bytes] = []
            busy = 0

            async def callback(msg: bytes) -> None:
                nonlocal busy
                busy += 1
                assert busy == 1  # never two at once
                await asyncio.sleep(0)
                got.append(msg)
                busy -= 1

            send_all(push, messages(100))
            async with AsyncSubscriber(pull, callback) as sub:
                await until(lambda: sub.received == 100)
            assert got == messages(100)

    run(body)


def test_callback_exceptions_are_reported_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with pipe() as (pull, push):
            good: List[bytes] = []
            reported: List[Exception] = []

            def callback(msg: bytes) -> None:
                if msg.endswith((b"3", b"7")):
                    raise ValueError(msg)
                good.append(msg)

            async def on_exception(exc: Exception) -> None:
                await asyncio.sleep(0)
                reported.append(exc)

            send_all(push, messages(20))
            async with AsyncSubscriber(pull, callback, on_exception) as sub:
                await until(lambda: sub.received == 20)
                assert sub.errors == 4
            assert [str(e) for e in reported] == [repr(b"message %d" % i) for i in (3, 7, 13, 17)]
            assert len(good) == 16

            # Without on_exception the exception is logged, and the loop goes on too.
            send_all(push, [b"x3", b"fine"])
            with caplog.at_level(logging.ERROR, logger="persizmq"):
                async with AsyncSubscriber(pull, callback) as sub:
                    await until(lambda: sub.received == 2)
                    assert sub.errors == 1
            assert good[-1] == b"fine"
            assert "the callback raised; still listening" in caplog.text

            # A failing on_exception is logged; the subscriber still goes on.
            def bad_handler(exc: Exception) -> None:
                raise RuntimeError("handler failed")

            send_all(push, [b"y3", b"fine again"])
            with caplog.at_level(logging.ERROR, logger="persizmq"):
                async with AsyncSubscriber(pull, callback, bad_handler) as sub:
                    await until(lambda: sub.received == 2)
            assert good[-1] == b"fine again"
            assert "on_exception of" in caplog.text

    run(body)


def test_a_storage_callback_stores_each_drained_batch_with_one_add_messages(
    tmp_path: pathlib.Path,
) -> None:
    memory = NotifyingStorage("never")
    always = NotifyingStorage("always")

    async def body() -> int:
        async with pipe() as (pull, push):
            for storage in (memory, always):
                send_all(push, messages(600))
                async with AsyncSubscriber(pull, storage.add_message, batch_size=256) as sub:
                    await until(lambda: sub.received == 600)
                assert storage.items() == messages(600)
                assert not storage.threads_of("add_message")
                calls = storage.threads_of("add_messages")
                assert 3 <= len(calls) < 600  # batches (at most 256 each), not one per message
            with persizmq.PersistentStorage(tmp_path / "q") as disk:
                send_all(push, [*messages(300), [b"multi", b"part"]])
                async with AsyncSubscriber(pull, disk.add_message) as sub:
                    await until(lambda: sub.received == 301)
                assert list(disk) == [*messages(300), [b"multi", b"part"]]
        return threading.get_ident()

    loop_thread = run(body)
    assert all(thread == loop_thread for thread in memory.threads_of("add_messages"))
    # sync="always": the fsyncing batches ran in the worker thread, never on the loop.
    assert loop_thread not in always.threads_of("add_messages")


def test_a_refused_batch_is_replayed_one_by_one_and_an_unknown_outcome_is_not(
    tmp_path: pathlib.Path,
) -> None:
    async def body() -> None:
        async with pipe() as (pull, push):
            # A bound refuses the batch with nothing stored: each message gets its own call.
            with persizmq.PersistentStorage(tmp_path / "q", max_messages=5) as bounded:
                reported: List[Exception] = []
                send_all(push, messages(10))
                async with AsyncSubscriber(pull, bounded.add_message, reported.append) as sub:
                    await until(lambda: sub.received == 10)
                assert list(bounded) == messages(5)
                assert sub.errors == 5
                assert all(isinstance(e, persizmq.QueueFullError) for e in reported)

            memory = NotifyingStorage("always")
            memory.fail_batch = persizmq.QueueFullError("full, nothing stored")
            send_all(push, messages(10))
            async with AsyncSubscriber(pull, memory.add_message) as sub:
                await until(lambda: sub.received == 10)
            assert sub.errors == 0
            assert memory.items() == messages(10)
            assert len(memory.threads_of("add_message")) == 10

            # Any other failure leaves the outcome unknown: reported once, never stored again.
            memory = NotifyingStorage("never")
            memory.fail_batch = persizmq.StorageWriteError(5, "fsync failed")
            reported = []
            send_all(push, messages(10))
            async with AsyncSubscriber(pull, memory.add_message, reported.append) as sub:
                await until(lambda: sub.received == 10)
            assert sub.errors == 10
            assert len(reported) == 1
            assert isinstance(reported[0], persizmq.StorageWriteError)
            assert memory.items() == []
            assert not memory.threads_of("add_message")

    run(body)


def test_aclose_is_prompt_under_load(tmp_path: pathlib.Path) -> None:
    stop = threading.Event()
    endpoint = f"ipc://{tmp_path}/load.zeromq"

    def flood() -> None:
        context: zmq.Context[Any] = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 100)
        push.connect(endpoint)
        try:
            while not stop.is_set():
                with contextlib.suppress(zmq.Again):
                    push.send(b"x" * 100)
        finally:
            push.close(linger=0)
            context.term()

    async def body() -> None:
        context = zmq.asyncio.Context()
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(endpoint)
        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            with persizmq.PersistentStorage(tmp_path / "q") as storage:
                total = 0
                for _ in range(3):
                    sub = AsyncSubscriber(pull, storage.add_message)
                    await until(lambda: sub.received > 2000)  # noqa: B023 (awaited here)
                    await within(sub.aclose(), 2.0)
                    assert not sub.operational
                    stopped_at = sub.received
                    await asyncio.sleep(0.01)  # a chance to receive more, which must not happen
                    assert sub.received == stopped_at
                    await within(sub.aclose(), 2.0)  # idempotent
                    total += sub.received
                assert len(storage) == total  # everything received was stored, once
            assert await within(pull.recv()) == b"x" * 100  # the socket is still ours, usable
        finally:
            stop.set()
            flooder.join(10)
            pull.close(linger=0)
            context.term()

    run(body)


def test_aclose_from_the_callback_and_right_after_construction() -> None:
    async def body() -> None:
        async with pipe() as (pull, push):
            got: List[bytes] = []
            sub: AsyncSubscriber

            async def callback(msg: bytes) -> None:
                got.append(msg)
                if len(got) == 5:
                    await sub.aclose()  # returns at once: this is the subscriber's own task
                    assert not sub.operational

            send_all(push, messages(50))
            sub = AsyncSubscriber(pull, callback)
            await until(sub._task.done)
            assert got == messages(5)
            assert sub.received == 5
            await within(sub.aclose(), 1.0)

            # The rest is still in the socket, for the next subscriber.
            idle = AsyncSubscriber(pull, got.append)
            await within(idle.aclose(), 1.0)  # at once, before it ran
            rest = AsyncSubscriber(pull, got.append)
            await until(lambda: len(got) == 50)
            await within(rest.aclose(), 1.0)  # while idle, waiting for a message
            assert got == messages(50)

    run(body)


def _peer_types() -> List[Tuple[str, int, int]]:
    return [
        ("SUB", zmq.SUB, zmq.PUB),
        ("XSUB", zmq.XSUB, zmq.PUB),
        ("PULL", zmq.PULL, zmq.PUSH),
        ("PAIR", zmq.PAIR, zmq.PAIR),
        ("DEALER", zmq.DEALER, zmq.DEALER),
    ]


@pytest.mark.parametrize(("name", "receive_type", "send_type"), _peer_types())
def test_every_receiving_socket_type(name: str, receive_type: int, send_type: int) -> None:
    async def body() -> None:
        async with pipe(receive_type, send_type) as (receiver, sender):
            if receive_type == zmq.SUB:
                receiver.setsockopt(zmq.SUBSCRIBE, b"")
            elif receive_type == zmq.XSUB:
                await receiver.send(b"\x01")  # subscribe to everything
            got: List[object] = []
            async with AsyncSubscriber(receiver, got.append):
                while not got:  # a PUB may drop what it sends before the subscription arrives
                    await sender.send_multipart([b"hello", name.encode()])
                    await asyncio.sleep(0.001)  # publishing period, not a wait for a result
            assert got[0] == [b"hello", name.encode()]

    run(body)


def test_the_callback_can_be_reassigned_while_running() -> None:
    storage = NotifyingStorage("never")

    async def body() -> None:
        async with pipe() as (pull, push):
            first: List[bytes] = []
            async with AsyncSubscriber(pull, first.append) as sub:
                send_all(push, messages(3))
                await until(lambda: sub.received == 3)
                sub.callback = storage.add_message
                send_all(push, messages(4))
                await until(lambda: sub.received == 7)
            assert first == messages(3)
            assert storage.items() == messages(4)
            assert storage.threads_of("add_messages")

    run(body)


def test_a_socket_closed_under_the_subscriber_is_reported() -> None:
    async def body() -> None:
        context = zmq.asyncio.Context()
        pull = context.socket(zmq.PULL)
        pull.bind(f"inproc://closed-{uuid.uuid4().hex}")
        reported: List[Exception] = []
        sub = AsyncSubscriber(pull, print, reported.append)
        await asyncio.sleep(0)  # let it wait on the socket
        pull.close(linger=0)
        await until(lambda: not sub.operational)
        await within(sub.aclose(), 1.0)
        assert len(reported) == 1
        assert isinstance(reported[0], zmq.ZMQError)
        assert reported[0].errno == zmq.ENOTSOCK
        context.term()

    run(body)


def test_bad_arguments(tmp_path: pathlib.Path) -> None:
    sync_context: zmq.Context[Any] = zmq.Context()
    sync_socket = sync_context.socket(zmq.PULL)
    try:
        with pytest.raises(RuntimeError, match="running event loop"):
            AsyncSubscriber(sync_socket, print)

        async def body() -> None:
            with pytest.raises(persizmq.MessageTypeError, match=r"zmq\.asyncio\.Context"):
                AsyncSubscriber(sync_socket, print)
            with pytest.raises(persizmq.MessageTypeError, match="got a str"):
                AsyncSubscriber("tcp://localhost:1", print)  # type: ignore[arg-type]
            async with pipe(zmq.PULL, zmq.PUSH) as (pull, push):
                with pytest.raises(persizmq.MessageTypeError, match="got a PUSH socket"):
                    AsyncSubscriber(push, print)
                bad: List[Tuple[Callable[[], object], type, str]] = [
                    (lambda: AsyncSubscriber(pull, 42), persizmq.MessageTypeError, "callback"),  # type: ignore[arg-type]
                    (
                        lambda: AsyncSubscriber(pull, print, "log"),  # type: ignore[arg-type]
                        persizmq.MessageTypeError,
                        "on_exception",
                    ),
                    (
                        lambda: AsyncSubscriber(pull, print, multipart=1),  # type: ignore[arg-type]
                        persizmq.MessageTypeError,
                        "multipart",
                    ),
                    (
                        lambda: AsyncSubscriber(pull, print, batch_size=0),
                        persizmq.InvalidArgumentError,
                        "batch_size",
                    ),
                ]
                for make, error, match in bad:
                    with pytest.raises(error, match=match):
                        make()
                sub = AsyncSubscriber(pull, print)
                with pytest.raises(persizmq.InvalidArgumentError, match="uses"):
                    AsyncSubscriber(pull, print)
                await sub.aclose()
                await AsyncSubscriber(pull, print).aclose()  # free again
            closed = zmq.asyncio.Context().socket(zmq.PULL)
            closed.close()
            with pytest.raises(persizmq.InvalidArgumentError, match="closed"):
                AsyncSubscriber(closed, print)

        run(body)
    finally:
        sync_socket.close(linger=0)
        sync_context.term()


def test_a_receive_timeout_on_the_socket_is_not_an_error() -> None:
    async def body() -> None:
        async with pipe() as (pull, push):
            pull.setsockopt(zmq.RCVTIMEO, 2)  # zmq.asyncio turns it into zmq.Again
            got: List[object] = []
            reported: List[Exception] = []
            async with AsyncSubscriber(pull, got.append, reported.append) as sub:
                start = time.monotonic()
                await until(lambda: time.monotonic() > start + 0.05)  # many time-outs passed
                assert sub.operational
                await push.send(b"late")
                await until(lambda: got == [b"late"])
            assert reported == []

    run(body)
