"""The background thread of :class:`~persizmq.ThreadedSubscriber`: receive, deliver, report.

:class:`ReceiveLoop` is the side of the subscriber that runs on its thread: the batching
receive loop, the hand-over of every message to the callback (or of every drained batch to a
storage's ``add_messages``), the sequence check and the reports of what failed. The subscriber
(``_threaded``) builds the state it reads, starts the thread and stops it.
"""

# Theory of operation
# ===================
#
# The batching loop. The thread blocks in ``zmq_poll`` on two items: the socket (POLLIN) and the
# read end of a private ``os.pipe()``. When the poll returns, the thread drains what is ready with
# non-blocking receives, up to ``batch_size`` messages, then polls again. Under load a wake-up
# therefore costs one poll per batch instead of one per message, and ``zmq.Again`` (nothing
# left) is raised once per wake-up; ``batch_size`` bounds how many messages the thread takes
# before it polls again, so a socket that never runs dry still gets polled. Everything
# that does not change per message (bound methods, constants, the poll items) is hoisted into
# locals before the loop; ``self.callback`` is read per message on purpose, so a callback
# reassigned while running is used from the next message on. Frames are received with
# ``copy=False`` because a ``zmq.Frame`` carries the "more frames follow" bit, which is several
# times cheaper than a ``getsockopt(RCVMORE)`` call; ``frame.bytes`` then makes the one copy.
# A multipart message (atomic in ZeroMQ: all its frames are there once the first one is) is
# always collected whole into a list.
#
# The receive from libzmq. Where the C extension is built, the loop receives through it instead
# (``_fast_loop``; see ``_fast_receive``): the same messages in the same form, taken straight
# from the libzmq that pyzmq uses, without pyzmq's per-call work (a zmq.Frame per message).
# For a storage's ``add_message`` one call takes the whole batch (up to ``batch_size``
# messages) and the batch goes to ``add_messages``; a stop requested meanwhile lets that batch
# be stored first, as the Python loop stores what it drained. For any other callback it takes
# one message a call, so a stop leaves the rest in the socket, which the caller gets back.
#
# How the thread ends. A stop request ends it cleanly. ``ETERM`` (the caller terminated the
# context) is a clean end too: no report, ``operational`` becomes False, and the caller can
# close the socket to let ``Context.term`` finish. Any other failure of the socket itself
# (``ENOTSOCK`` when it was closed under the subscriber, for example) is reported once to
# ``on_exception`` and ends the thread, since the socket cannot be trusted any more. Exceptions
# from the callback never end it: they are counted, reported, and the next message is processed
# — except a ``ClosedError`` once persizmq's exit hook has closed the storages of a script that
# never shuts down: the interpreter is exiting, so the thread ends quietly.
#
# Sequence numbers. With ``sequence_frame``, every message passes through a ``SequenceTracker``
# before it is delivered (or queued for the storage's ``add_messages``); a gap it reports goes to
# ``on_gap`` right away, on this thread, so ``on_gap`` sees a gap before the message that
# revealed it is stored. What ``on_gap`` raises is logged, as a failing ``on_exception`` is; the
# message is delivered all the same.

import errno
import logging
from typing import Any, List, Optional, Tuple

import zmq

from persizmq._engine._registry import exit_started
from persizmq._errors import ClosedError
from persizmq._protocol import Storage, is_storage_add, nothing_stored
from persizmq._sequence import Gap, SequenceTracker
from persizmq._subscriber._arguments import Callback, ExceptionCallback, GapCallback
from persizmq._subscriber._fast_receive import Receiver, fast_receiver

__all__ = ["ReceiveLoop"]

_LOGGER = logging.getLogger("persizmq")


def poll_closed(sock: "zmq.Socket[Any]") -> None:
    """Raise ``ENOTSOCK`` if ``sock`` was closed under the loop: a closed socket has a NULL
    handle, which zmq_poll would take for fd 0."""
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)


class ReceiveLoop:
    """What the subscriber's thread does; the subscriber sets the attributes below.

    ``callback``, ``on_exception`` and ``on_gap`` are read per message or per report, so a
    callable reassigned while running is used from then on. ``_stop_requested`` is set by
    ``shutdown`` (from any thread) and by :meth:`_report` at interpreter exit.
    """

    callback: Callback
    on_exception: Optional[ExceptionCallback]
    on_gap: Optional[GapCallback]
    _socket: "zmq.Socket[Any]"
    _wake_r: int
    _batch_size: int
    _multipart: bool
    _tracker: Optional[SequenceTracker]
    _received: int
    _errors: int
    _stop_requested: bool

    def _release(self) -> None:
        """Give the socket and the pipe back once the thread ends (the subscriber's part)."""
        raise NotImplementedError

    def _report(self, exc: Exception, what: str) -> None:
        """Hand ``exc`` to ``on_exception`` (or log it); never raises."""
        if isinstance(exc, ClosedError) and exit_started():
            # The interpreter is exiting and persizmq's exit hook closed the storage (a script
            # that never shuts down): that is the end of the stream, not a fault to report.
            self._stop_requested = True
            return
        handler = self.on_exception
        if handler is None:
            _LOGGER.exception("%s %r", what, self, exc_info=exc)
            return
        try:
            handler(exc)
        except Exception:  # a failing handler must not stop the subscriber
            _LOGGER.exception(
                "on_exception of %r raised while handling %s: %r", self, type(exc).__name__, exc
            )

    def _run(self) -> None:
        """The background thread: run the receive loop, report why it failed, clean up."""
        try:
            self._receive_loop()
        except zmq.ZMQError as err:
            if err.errno != zmq.ETERM:
                self._report(err, "persizmq: the socket failed; stopped listening:")
        except Exception as exc:  # noqa: BLE001 (reported once; the thread ends)
            self._report(exc, "persizmq: the listening thread failed; stopped listening:")
        finally:
            self._release()

    def _receive_loop(self) -> None:  # noqa: PLR0912, PLR0915 (the hot loop stays in one frame on purpose)
        """Poll, drain up to ``batch_size`` messages, repeat until a stop is requested."""
        receive = fast_receiver(self._socket)
        if receive is not None:
            self._fast_loop(receive)
            return
        sock = self._socket
        recv = sock.recv
        poll = zmq.zmq_poll
        poll_items: List[Tuple[Any, int]] = [(sock, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        batch = range(self._batch_size)
        multipart = self._multipart
        noblock = zmq.NOBLOCK
        again = zmq.Again
        tracker = self._tracker
        check = tracker.check if tracker is not None else None
        last_callback: Callback = self.callback
        batching = is_storage_add(last_callback)
        stored: List[Any] = []  # messages for the storage's add_messages, in order
        msg: object
        while not self._stop_requested:
            poll_closed(sock)
            poll(poll_items, -1)
            try:
                for _ in batch:
                    if self._stop_requested:
                        return
                    try:
                        frame = recv(noblock, False)
                    except again:
                        break
                    if frame.more:
                        frames = [frame.bytes]
                        while frame.more:
                            frame = recv(noblock, False)
                            frames.append(frame.bytes)
                        msg = frames
                    elif multipart:
                        msg = [frame.bytes]
                    else:
                        msg = frame.bytes
                    if check is not None:
                        gap = check(msg)
                        if gap is not None:
                            self._gap(gap)
                    callback = self.callback
                    if callback is not last_callback:
                        if stored:
                            self._store(last_callback, stored)
                        last_callback = callback
                        batching = is_storage_add(callback)
                    if batching:
                        stored.append(msg)
                    else:
                        self._deliver(callback, msg)
            finally:
                if stored:
                    self._store(last_callback, stored)

    def _fast_loop(self, receive: Receiver) -> None:
        """:meth:`_receive_loop` with the extension's receive: the messages for a storage in one
        call a batch, a callback's one call each (a stop leaves the rest in the socket)."""
        sock = self._socket
        poll = zmq.zmq_poll
        poll_items: List[Tuple[Any, int]] = [(sock, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        batch_size = self._batch_size
        multipart = self._multipart
        tracker = self._tracker
        check = tracker.check if tracker is not None else None
        ran_dry = (errno.EAGAIN, errno.EINTR)
        last_callback: Optional[Callback] = None
        batching = False
        while not self._stop_requested:
            poll_closed(sock)
            poll(poll_items, -1)
            taken = 0
            while taken < batch_size and not self._stop_requested:
                callback = self.callback
                if callback is not last_callback:
                    last_callback = callback
                    batching = is_storage_add(callback)
                # A socket closed meanwhile ends the take with ENOTSOCK: the receive reads the
                # handle itself, under the GIL (a handle kept from before would be freed memory).
                msgs, err = receive(batch_size - taken if batching else 1, multipart)
                taken += len(msgs)
                if msgs:
                    if check is not None:
                        for msg in msgs:
                            gap = check(msg)
                            if gap is not None:
                                self._gap(gap)
                    if batching:
                        self._store(callback, msgs)
                    else:
                        self._deliver(callback, msgs[0])
                if err:
                    if err in ran_dry:
                        break
                    raise zmq.ZMQError(err)

    def _gap(self, gap: Gap) -> None:
        """Hand a gap to ``on_gap``; log what it raises."""
        handler = self.on_gap
        if handler is None:
            return
        try:
            handler(gap)
        except Exception:  # a failing handler must not stop the subscriber
            _LOGGER.exception("on_gap of %r raised while handling %r", self, gap)

    def _deliver(self, callback: Callback, msg: object) -> None:
        """Hand one message to the callback; report what it raises."""
        try:
            callback(msg)
        except Exception as exc:  # noqa: BLE001 (reported; the next message follows)
            self._errors += 1
            self._report(exc, "persizmq: the callback raised; still listening:")
        self._received += 1

    def _store(self, callback: Callback, stored: List[Any]) -> None:
        """The callback is a storage's ``add_message``: store the drained messages with one
        ``add_messages`` call (one write, one fsync), then empty ``stored``.

        If the storage refused the batch with nothing stored (a bound, a message too large or of
        the wrong type; see :mod:`persizmq._protocol`), the messages go through ``add_message``
        one by one, so each gets exactly what a call of its own would get. Any other failure
        leaves the outcome unknown (an fsync failed after the write, say): the batch is reported
        once and never stored again, so nothing is stored twice.
        """
        storage: Storage = getattr(callback, "__self__")  # noqa: B009 (typed)
        try:
            storage.add_messages(stored)
            self._received += len(stored)
        except Exception as exc:  # noqa: BLE001 (replayed or reported below)
            if nothing_stored(exc):
                for msg in stored:
                    self._deliver(callback, msg)
            else:
                self._errors += len(stored)
                self._received += len(stored)
                self._report(
                    exc,
                    f"persizmq: storing a batch of {len(stored)} messages failed and its outcome "
                    f"is unknown (it is not stored again); still listening:",
                )
        stored.clear()
