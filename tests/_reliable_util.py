"""Helpers of the acknowledged-transport tests: a raw sender and a fake receiver that speak the
wire protocol frame by frame, and a receiver set up on a storage in a temporary directory."""

import pathlib
from types import TracebackType
from typing import Any, List, Optional, Sequence, Tuple, Type, Union

import zmq

import persizmq
from persizmq._reliable import _wire
from tests._helpers import SocketTracker

__all__ = ["DEADLINE", "FakeReceiver", "RawSender", "Served", "serve"]

DEADLINE = 20.0  # generous: the suite may run on a slow, loaded machine


class RawSender:
    """A DEALER that sends protocol frames by hand (what a ReliableSender, or a peer that is
    not one, may send)."""

    def __init__(self, sockets: SocketTracker, endpoint: str, sender: bytes) -> None:
        """Connect to ``endpoint`` as sender ``sender`` (16 bytes)."""
        self.sock = sockets(zmq.DEALER)
        self.sock.connect(endpoint)
        self.sender = sender

    def hello(self, nonce: int = 1) -> _wire.Welcome:
        """Send HELLO and return the WELCOME."""
        self.sock.send(_wire.encode_hello(self.sender, nonce))
        reply = self.reply()
        assert isinstance(reply, _wire.Welcome), reply
        assert reply.nonce == nonce
        return reply

    def data(
        self, msgs: Sequence[_wire.Entry], first: int, base: int = 1, prev: Optional[int] = None
    ) -> None:
        """Send one DATA message."""
        prev = first - 1 if prev is None else prev
        self.sock.send_multipart(
            _wire.encode_data(self.sender, base, prev, first, _wire.pack(msgs))
        )

    def reply(
        self, timeout: float = DEADLINE
    ) -> Union[_wire.Welcome, _wire.Ack, _wire.Refuse, _wire.ErrorReply]:
        """The next reply (decoded)."""
        assert self.sock.poll(int(timeout * 1000)), "no reply from the receiver"
        return _wire.decode_reply(self.sock.recv_multipart())

    def ack(self, timeout: float = DEADLINE) -> _wire.Ack:
        """The next reply, which must be an ACK."""
        reply = self.reply(timeout)
        assert isinstance(reply, _wire.Ack), reply
        return reply


class FakeReceiver:
    """A ROUTER that answers a ReliableSender by hand."""

    def __init__(self, sockets: SocketTracker) -> None:
        """Bind on a free loopback port (see :attr:`endpoint`)."""
        self.sock = sockets(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.hellos = 0

    def request(self, timeout: float = DEADLINE) -> Tuple[bytes, Union[_wire.Hello, _wire.Data]]:
        """The next request: ``(routing id, decoded)``."""
        assert self.sock.poll(int(timeout * 1000)), "nothing from the sender"
        frames = self.sock.recv_multipart()
        return frames[0], _wire.decode_request(frames[1:])

    def answer(self, routing: bytes, frames: Union[bytes, List[bytes]]) -> None:
        """Send ``frames`` to the peer ``routing``."""
        self.sock.send_multipart([routing, *([frames] if isinstance(frames, bytes) else frames)])

    def next_data(self, high: int = 0, limit: int = 1 << 20) -> Tuple[bytes, _wire.Data]:
        """The next DATA; every HELLO before it is answered with a WELCOME of ``high``."""
        while True:
            routing, request = self.request()
            if isinstance(request, _wire.Data):
                return routing, request
            self.hellos += 1
            welcome = _wire.encode_welcome(request.sender, request.nonce, high, limit)
            self.answer(routing, welcome)


class Served:
    """A ReliableReceiver on a ROUTER bound to a free port, storing into ``directory``."""

    def __init__(
        self,
        sockets: SocketTracker,
        directory: pathlib.Path,
        *,
        port: int = 0,
        sync: str = "periodic",
        role: str = "both",
        **kwargs: Any,
    ) -> None:
        """Open the storage and the receiver, then bind (``port`` 0: a free one)."""
        self.storage = persizmq.PersistentStorage(directory, sync=sync, role=role)
        self.sock = sockets(zmq.ROUTER)
        self.receiver = persizmq.ReliableReceiver(self.sock, self.storage, **kwargs)
        if port:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
        else:
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.port = port
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def close(self) -> None:
        """Stop the receiver, close the socket and the storage."""
        self.receiver.close()
        self.sock.close(linger=0)
        self.storage.close()

    def __enter__(self) -> "Served":
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close everything."""
        self.close()


def serve(sockets: SocketTracker, directory: pathlib.Path, **kwargs: Any) -> Served:
    """Shorthand for :class:`Served`."""
    return Served(sockets, directory, **kwargs)
