"""Child processes of the acknowledged-transport crash trials (test_reliable_crash.py).

``sender OUTBOX ENDPOINT NAME INCARNATION LOG SYNC``: a ReliableSender that sends numbered
messages ``NAME:INCARNATION:N`` in batches of random size, forever, and after each
``send_many`` returned appends ``INCARNATION COUNT`` to LOG (``COUNT`` messages accepted so
far) with a plain ``os.write`` — the page cache keeps it when the process is SIGKILLed.

``finish OUTBOX ENDPOINT NAME INCARNATION LOG SYNC COUNT``: sends COUNT messages, logs them,
then ``flush(60)``; exit 0 if everything was acknowledged, 3 if not.

``proxy LISTEN_PORT TARGET_PORT``: relays TCP connections from 127.0.0.1:LISTEN_PORT to
127.0.0.1:TARGET_PORT (a link that a SIGKILL of this process cuts); prints ``ready``.
"""

import faulthandler
import os
import random
import selectors
import socket
import sys
import time
from typing import Dict, List


def _sender(argv: List[str]) -> int:
    import persizmq

    outbox, endpoint, name, incarnation, log, sync = argv[:6]
    count = int(argv[6]) if len(argv) > 6 else 0
    # The last incarnation ("finish") sends the backlog with a wide window: a window of 1 is one
    # round trip (and one fsync) per message, too slow for a backlog of thousands.
    window = 1000 if count else rng_window()
    sender = persizmq.ReliableSender(outbox, endpoint, sync=sync, ack_timeout=0.3, window=window)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    prefix = f"{name}:{incarnation}:".encode()
    if count:
        sender.send_many([prefix + b"%d" % i for i in range(count)])
        os.write(fd, f"{incarnation} {count}\n".encode())
        done = sender.flush(60)
        if not done:
            link = sender._link
            print(
                f"flush failed: {sender.stats()} acked={link.acked} read_high={link.read_high} "
                f"unsent={[(b.first, b.last) for b in list(link.unsent)[:3]]} "
                f"unacked={[(b.first, b.last) for b in list(link.unacked)[:3]]} "
                f"welcomed={link.welcomed} connected={link.connected} "
                f"last_stored={sender._outbox.last_stored}",
                flush=True,
            )
            faulthandler.dump_traceback(all_threads=True)
        sender.close()
        return 0 if done else 3
    rng = random.Random()
    sent = 0
    print("ready", flush=True)
    while True:
        size = rng.randint(1, 40)
        sender.send_many([prefix + b"%d" % (sent + i) for i in range(size)])
        sent += size
        os.write(fd, f"{incarnation} {sent}\n".encode())
        time.sleep(rng.uniform(0, 0.004))  # pacing the load, not waiting for anything


def rng_window() -> int:
    """Windows from tiny (one batch in flight) to large, so both regimes are exercised."""
    return random.choice([1, 8, 100, 1000])


def _proxy(argv: List[str]) -> int:
    listen_port, target_port = int(argv[0]), int(argv[1])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    peers: Dict[socket.socket, socket.socket] = {}
    print("ready", flush=True)

    def drop(sock: socket.socket) -> None:
        other = peers.pop(sock, None)
        for end in (sock, other):
            if end is not None:
                peers.pop(end, None)
                selector.unregister(end)
                end.close()

    while True:
        for key, _mask in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                client, _addr = server.accept()
                try:
                    target = socket.create_connection(("127.0.0.1", target_port), timeout=1)
                except OSError:
                    client.close()
                    continue
                target.settimeout(None)
                peers[client], peers[target] = target, client
                selector.register(client, selectors.EVENT_READ)
                selector.register(target, selectors.EVENT_READ)
                continue
            if sock not in peers:
                continue
            try:
                data = sock.recv(1 << 16)
                if data:
                    peers[sock].sendall(data)
                    continue
            except OSError:
                pass
            drop(sock)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command in ("sender", "finish"):
        sys.exit(_sender(rest))
    sys.exit(_proxy(rest))
