"""Soak: many messages through publisher -> ThreadedSubscriber -> PersistentStorage -> consumer.

The whole pipeline runs in this process (a publisher thread on a PUB socket, the subscriber's
thread, a consumer thread popping in order), over TCP on the loopback interface. Both socket
high-water marks are off, and the publisher keeps at most ``WINDOW`` messages ahead of the
consumer, so nothing may be dropped and the pending count stays bounded. While it runs, the
test samples the resident memory (``VmRSS``) and the storage's stats, and checks:

* every message arrives, once, in order, byte for byte (none lost, none doubled);
* the memory stays flat: once settled (the first half of the run) it grows by no more than a
  few MiB, whatever the number of messages (a leak per message would show over millions);
* the disk use follows the pending count: at every sample the storage's files hold at most
  the pending records plus two segments and the position log; at the end, almost nothing.

The long form (``--run-slow``) moves 3,000,000 messages; the default 50,000.
"""

import pathlib
import struct
import threading
import time
from typing import List, Optional, Tuple

import pytest
import zmq

import persizmq
from tests._helpers import SocketTracker

SIZE = 100
WINDOW = 20_000
SEGMENT_SIZE = 1 << 20
HEADER = 9
POSITION_LOG_MAX = (1 << 20) + 28


def message(i: int) -> bytes:
    return struct.pack(">Q", i) + bytes([i % 251]) * (SIZE - 8)


def rss_bytes() -> int:
    with open("/proc/self/status", "rb") as file:
        for line in file:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Pipeline:
    """Publisher thread, subscriber, storage, consumer thread; the counters they share."""

    def __init__(self, directory: pathlib.Path, sockets: SocketTracker, total: int) -> None:
        self.total = total
        self.cond = threading.Condition()
        self.published = 0
        self.consumed = 0
        self.failure: Optional[str] = None
        self.storage = persizmq.PersistentStorage(
            directory, sync="periodic", segment_size=SEGMENT_SIZE
        )
        self.pub = sockets(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.sub = sockets(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.pub.getsockopt_string(zmq.LAST_ENDPOINT))
        self.join()
        self.subscriber = persizmq.ThreadedSubscriber(
            self.storage.add_message, subscriber=self.sub, on_exception=self.on_exception
        )

    def join(self) -> None:
        """Publish a probe until the SUB socket gets one, then drain it (slow joiner)."""
        deadline = time.monotonic() + 10
        while not self.sub.poll(5):
            assert time.monotonic() < deadline, "the subscriber did not join"
            self.pub.send(b"probe")
        self.pub.send(b"last-probe")
        while self.sub.recv() != b"last-probe":
            pass

    def on_exception(self, exc: Exception) -> None:
        self.fail(f"the subscriber reported {exc!r}")

    def fail(self, why: str) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = why
            self.cond.notify_all()

    def publish(self) -> None:
        send = self.pub.send
        for i in range(self.total):
            if i - self.consumed >= WINDOW:
                with self.cond:
                    while i - self.consumed >= WINDOW and self.failure is None:
                        self.cond.wait(1.0)
                    if self.failure is not None:
                        return
            send(message(i))
            self.published = i + 1

    def consume(self) -> None:
        storage = self.storage
        try:
            for i in range(self.total):
                msg = storage.front(block=True, timeout=30)
                if msg is None:
                    self.fail(f"message {i} did not arrive within 30 s")
                    return
                if msg != message(i):
                    self.fail(f"message {i} expected, got {bytes(msg[:8]).hex()}...")  # type: ignore[arg-type]
                    return
                storage.pop_front()
                if i % 256 == 255 or i == self.total - 1:
                    with self.cond:
                        self.consumed = i + 1
                        self.cond.notify_all()
        except Exception as exc:  # noqa: BLE001 (reported to the test thread)
            self.fail(f"the consumer raised {exc!r}")

    def close(self) -> None:
        self.subscriber.shutdown()
        self.storage.close()


def run_soak(
    tmp_path: pathlib.Path, sockets: SocketTracker, total: int, timeout: float
) -> Tuple[List[Tuple[int, int, int, int, int]], persizmq.StorageStats]:
    """Run the pipeline; return samples ``(consumed, rss, disk, pending, pending_bytes)``."""
    pipeline = Pipeline(tmp_path / "queue", sockets, total)
    samples: List[Tuple[int, int, int, int, int]] = []
    threads = [
        threading.Thread(target=pipeline.publish, daemon=True),
        threading.Thread(target=pipeline.consume, daemon=True),
    ]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        with pipeline.cond:
            while pipeline.consumed < total and pipeline.failure is None:
                remaining = deadline - time.monotonic()
                assert remaining > 0, (
                    f"soak not done in {timeout} s: published {pipeline.published}, "
                    f"consumed {pipeline.consumed}, received {pipeline.subscriber.received}"
                )
                pipeline.cond.wait(min(0.05, remaining))  # a sample every 50 ms at most
                stats = pipeline.storage.stats()
                samples.append(
                    (
                        pipeline.consumed,
                        rss_bytes(),
                        stats.disk_bytes,
                        stats.pending,
                        stats.pending_bytes,
                    )
                )
        assert pipeline.failure is None, pipeline.failure
        for thread in threads:
            thread.join(timeout=10)
        assert pipeline.subscriber.received == total
        assert pipeline.subscriber.errors == 0
        final = pipeline.storage.stats()
    finally:
        pipeline.fail("test over")
        pipeline.close()
    return samples, final


def check_samples(
    samples: List[Tuple[int, int, int, int, int]],
    final: persizmq.StorageStats,
    total: int,
    rss_allowance: int,
) -> None:
    assert len(samples) >= 5, samples
    record = HEADER + SIZE
    for consumed, _rss, disk, pending, pending_bytes in samples:
        assert pending <= WINDOW + 1, (consumed, pending)
        bound = pending * record + 2 * (SEGMENT_SIZE + record) + POSITION_LOG_MAX + 4096
        assert disk <= bound, f"{disk} bytes on disk for {pending} pending messages"
        assert pending_bytes <= pending * record + 2 * SEGMENT_SIZE
    assert final.pending == 0
    assert final.corrupt_regions == 0
    assert final.disk_bytes <= SEGMENT_SIZE + record + POSITION_LOG_MAX
    # The allocator and ZeroMQ's buffers settle during the first half (about 1.5 million
    # messages); after that the RSS only wanders. A leak of a few bytes per message would
    # show as growth from the start of the second half to its end.
    settled = [rss for consumed, rss, *_ in samples if total // 2 <= consumed < total * 6 // 10]
    end = [rss for consumed, rss, *_ in samples if consumed >= total * 9 // 10]
    assert settled, "no sample between 50 % and 60 % of the run"
    assert end, "no sample in the last 10 % of the run"
    growth = sum(end) / len(end) - sum(settled) / len(settled)
    assert growth <= rss_allowance, (
        f"RSS grew by {growth / 2**20:.1f} MiB in the second half of the run "
        f"({min(settled) / 2**20:.1f}..{max(settled) / 2**20:.1f} -> "
        f"{min(end) / 2**20:.1f}..{max(end) / 2**20:.1f} MiB)"
    )


def test_soak_quick(tmp_path: pathlib.Path, sockets: SocketTracker) -> None:
    total = 50_000
    samples, final = run_soak(tmp_path, sockets, total, timeout=120)
    check_samples(samples, final, total, rss_allowance=24 << 20)


@pytest.mark.slow
def test_soak_millions(
    tmp_path: pathlib.Path, sockets: SocketTracker, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 3_000_000
    started = time.monotonic()
    samples, final = run_soak(tmp_path, sockets, total, timeout=1800)
    check_samples(samples, final, total, rss_allowance=8 << 20)
    elapsed = time.monotonic() - started
    rss = [s[1] for s in samples if s[0] >= total // 2]
    with capsys.disabled():
        print(
            f"\nsoak: {total} messages in {elapsed:.1f} s ({total / elapsed:,.0f} msg/s), "
            f"RSS in the second half {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB "
            f"(max {max(rss) / 2**20:.1f}), "
            f"max disk {max(s[2] for s in samples) / 2**20:.1f} MiB, "
            f"max pending {max(s[3] for s in samples)}"
        )
