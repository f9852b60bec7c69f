"""A stateful model test: PersistentStorage against a ``collections.deque``.

Hypothesis draws sequences of adds (single and multipart), batches, peeks, pops, iterations,
reopenings and simulated crashes (the object dropped with ``del``, no ``close()``), over small
segment sizes (so records cross segment boundaries all the time) and all three sync modes;
after every step the storage must hold exactly what the deque holds. A second machine does the
same for bounded storages (max_messages, max_bytes, each overflow policy), and property tests
check that one add_messages call stores what the same add_message calls would.
"""

import collections
import contextlib
import pathlib
import shutil
import tempfile
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import persizmq
from persizmq import Message, MessageLike, PersistentStorage

SYNC_MODES = ("always", "periodic", "never")

frames = st.binary(max_size=40)
messages: "st.SearchStrategy[Message]" = st.one_of(
    st.binary(max_size=80),
    st.lists(frames, max_size=4),
)
segment_sizes = st.integers(min_value=1, max_value=200)
sync_modes = st.sampled_from(SYNC_MODES)


def record_size(msg: Message) -> int:
    """Bytes of a message's record: a 16-byte header (u32 salt, u32 kind and index, u32 length,
    u32 crc), then the
    payload (a multipart message's: u32 frame count, then u32 length and bytes per frame)."""
    if isinstance(msg, bytes):
        return 16 + len(msg)
    return 16 + 4 + sum(4 + len(frame) for frame in msg)


class StorageModel(RuleBasedStateMachine):
    """The storage must behave as a deque of messages, across reopenings and crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="persizmq-model-"))
        self.directory = self.tmp / "q"
        self.model: Deque[Message] = collections.deque()
        self.storage: Optional[PersistentStorage] = None
        self.segment_size = 1
        self.sync = "never"

    @property
    def s(self) -> PersistentStorage:
        assert self.storage is not None
        return self.storage

    def _open(self) -> None:
        self.storage = PersistentStorage(
            self.directory, segment_size=self.segment_size, sync=self.sync
        )

    @initialize(segment_size=segment_sizes, sync=sync_modes)
    def open_storage(self, segment_size: int, sync: str) -> None:
        self.segment_size = segment_size
        self.sync = sync
        self._open()

    @rule(msg=messages)
    def add(self, msg: Message) -> None:
        self.s.add_message(msg)
        self.model.append(msg)

    @rule(batch=st.lists(st.one_of(st.none(), messages), max_size=8))
    def add_messages(self, batch: List[Optional[Message]]) -> None:
        stored = self.s.add_messages(batch)
        kept = [msg for msg in batch if msg is not None]
        assert stored == len(kept)
        self.model.extend(kept)

    @rule()
    def front(self) -> None:
        expected = self.model[0] if self.model else None
        assert self.s.front() == expected

    @rule()
    def front_block_no_wait(self) -> None:
        expected = self.model[0] if self.model else None
        assert self.s.front(block=True, timeout=0) == expected

    @rule()
    def pop_front(self) -> None:
        assert self.s.pop_front() is bool(self.model)
        if self.model:
            self.model.popleft()

    @rule()
    def front_then_pop(self) -> None:
        msg = self.s.front()
        if self.model:
            assert msg == self.model.popleft()
            assert self.s.pop_front() is True
        else:
            assert msg is None
            assert self.s.pop_front() is False

    @rule()
    def iterate(self) -> None:
        assert list(self.s) == list(self.model)

    @rule(segment_size=segment_sizes, sync=sync_modes)
    def close_and_reopen(self, segment_size: int, sync: str) -> None:
        self.s.close()
        assert self.s.closed
        self.segment_size = segment_size
        self.sync = sync
        self._open()

    @rule()
    def crash(self) -> None:
        # No close(): the object is dropped; its directory must be released at once.
        self.storage = None
        self._open()

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def drain_half(self) -> None:
        for _ in range((len(self.model) + 1) // 2):
            assert self.s.front() == self.model.popleft()
            assert self.s.pop_front() is True

    @invariant()
    def same_length(self) -> None:
        if self.storage is not None:
            assert len(self.storage) == len(self.model)
            stats = self.storage.stats()
            assert stats.pending == len(self.model)
            # pending_bytes: the records of the pending messages, headers included.
            assert stats.pending_bytes == sum(map(record_size, self.model))

    def teardown(self) -> None:
        try:
            if self.storage is not None:
                self.storage.close()
                # What was left pending is still there after the last reopen.
                with PersistentStorage(self.directory, sync="never") as last:
                    assert list(last) == list(self.model)
        finally:
            self.storage = None
            shutil.rmtree(self.tmp, ignore_errors=True)


StorageModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.usefixtures("lean_impl")  # the lean paths in C and in Python (see _engine._lean)
def test_the_storage_behaves_as_a_deque() -> None:
    run_state_machine_as_test(StorageModel, settings=StorageModel.TestCase.settings)


class BoundedStorageModel(RuleBasedStateMachine):
    """A bounded storage against a deque that applies the bounds as documented: a message that
    does not fit is refused ("raise": QueueFullError; "drop_newest": dropped) or makes room by
    dropping the oldest ("drop_oldest"); one that can never fit is never stored."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="persizmq-bounded-"))
        self.directory = self.tmp / "q"
        self.model: Deque[Message] = collections.deque()
        self.storage: Optional[PersistentStorage] = None
        self.kwargs: Dict[str, Any] = {}
        self.dropped_oldest = 0
        self.dropped_newest = 0

    @property
    def s(self) -> PersistentStorage:
        assert self.storage is not None
        return self.storage

    def _open(self) -> None:
        self.storage = PersistentStorage(self.directory, **self.kwargs)
        self.dropped_oldest = self.dropped_newest = 0  # counted per opened object

    @initialize(
        max_messages=st.none() | st.integers(1, 8),
        max_bytes=st.none() | st.integers(1, 300),
        overflow=st.sampled_from(["raise", "drop_oldest", "drop_newest"]),
        segment_size=segment_sizes,
        sync=sync_modes,
    )
    def open_storage(
        self,
        max_messages: Optional[int],
        max_bytes: Optional[int],
        overflow: str,
        segment_size: int,
        sync: str,
    ) -> None:
        self.kwargs = {
            "max_messages": max_messages,
            "max_bytes": max_bytes,
            "overflow": overflow,
            "segment_size": segment_size,
            "sync": sync,
        }
        self._open()

    def _fits(self, msgs: List[Message]) -> bool:
        max_messages, max_bytes = self.kwargs["max_messages"], self.kwargs["max_bytes"]
        if max_messages is not None and len(msgs) > max_messages:
            return False
        return max_bytes is None or sum(map(record_size, msgs)) <= max_bytes

    @rule(msg=messages)
    def add(self, msg: Message) -> None:
        overflow = self.kwargs["overflow"]
        wanted = [*self.model, msg]
        if self._fits(wanted):
            self.s.add_message(msg)
            self.model.append(msg)
        elif overflow == "raise":
            with pytest.raises(persizmq.QueueFullError):
                self.s.add_message(msg)
        elif overflow == "drop_newest" or not self._fits([msg]):
            self.s.add_message(msg)
            self.dropped_newest += 1
        else:
            self.s.add_message(msg)
            while not self._fits([*self.model, msg]):
                self.model.popleft()
                self.dropped_oldest += 1
            self.model.append(msg)

    @precondition(lambda self: self.kwargs["overflow"] == "raise")
    @rule(batch=st.lists(messages, max_size=5))
    def add_messages_all_or_nothing(self, batch: List[Message]) -> None:
        if self._fits([*self.model, *batch]):
            assert self.s.add_messages(batch) == len(batch)
            self.model.extend(batch)
        else:
            with pytest.raises(persizmq.QueueFullError):
                self.s.add_messages(batch)

    @rule()
    def pop_front(self) -> None:
        expected = self.model[0] if self.model else None
        assert self.s.front() == expected
        assert self.s.pop_front() is bool(self.model)
        if self.model:
            self.model.popleft()

    @rule()
    def close_and_reopen(self) -> None:
        self.s.close()
        self._open()

    @rule()
    def crash(self) -> None:
        self.storage = None
        self._open()

    @invariant()
    def same_content(self) -> None:
        if self.storage is not None:
            assert list(self.storage) == list(self.model)
            stats = self.storage.stats()
            assert stats.pending == len(self.model)
            assert stats.pending_bytes == sum(map(record_size, self.model))
            assert stats.dropped_oldest == self.dropped_oldest
            assert stats.dropped_newest == self.dropped_newest

    def teardown(self) -> None:
        try:
            if self.storage is not None:
                self.storage.close()
        finally:
            self.storage = None
            shutil.rmtree(self.tmp, ignore_errors=True)


BoundedStorageModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.usefixtures("lean_impl")
def test_a_bounded_storage_behaves_as_a_bounded_deque() -> None:
    run_state_machine_as_test(BoundedStorageModel, settings=BoundedStorageModel.TestCase.settings)


def _batch_and_calls(
    tmp: pathlib.Path,
    overflow: str,
    *,
    bounds: Dict[str, int],
    segment_size: int,
    before: List[bytes],
    batch: List[bytes],
) -> None:
    """Add ``batch`` with one add_messages call to one storage and with add_message calls to
    another; both must end up holding the same messages and counting the same drops (the
    documented promise: "the batch is treated as that many add_message calls would be")."""
    kwargs: Dict[str, Any] = dict(bounds, overflow=overflow, segment_size=segment_size)
    with contextlib.ExitStack() as stack:
        batched = stack.enter_context(PersistentStorage(tmp / "batch", sync="never", **kwargs))
        called = stack.enter_context(PersistentStorage(tmp / "calls", sync="never", **kwargs))
        for storage in (batched, called):
            for msg in before:
                with contextlib.suppress(persizmq.QueueFullError):
                    storage.add_message(msg)
        assert list(batched) == list(called)
        initial = list(batched)
        try:
            batched.add_messages(batch)
            batch_refused = False
        except persizmq.QueueFullError:
            batch_refused = True
        calls_refused = False
        for msg in batch:
            try:
                called.add_message(msg)
            except persizmq.QueueFullError:
                calls_refused = True
        assert batch_refused is calls_refused
        if batch_refused:  # all or nothing
            assert list(batched) == initial
            return
        assert list(batched) == list(called)
        assert len(batched) == len(called)
        b, c = batched.stats(), called.stats()
        assert (b.dropped_oldest, b.dropped_newest) == (c.dropped_oldest, c.dropped_newest)
        assert b.pending_bytes == c.pending_bytes
        if "max_bytes" in bounds:
            assert b.pending_bytes <= bounds["max_bytes"]


bounds_strategy = st.one_of(
    st.fixed_dictionaries({"max_messages": st.integers(1, 6)}),
    st.fixed_dictionaries({"max_bytes": st.integers(1, 250)}),
    st.fixed_dictionaries({"max_messages": st.integers(1, 6), "max_bytes": st.integers(1, 250)}),
)
small_batches = st.lists(st.binary(max_size=60), max_size=8)
batch_settings = settings(max_examples=40, deadline=None, database=None)


@batch_settings
@given(
    bounds=bounds_strategy, segment_size=segment_sizes, before=small_batches, batch=small_batches
)
def test_add_messages_is_like_add_message_calls_raise(
    bounds: Dict[str, int], segment_size: int, before: List[bytes], batch: List[bytes]
) -> None:
    with tempfile.TemporaryDirectory(prefix="persizmq-batch-") as tmp:
        _batch_and_calls(
            pathlib.Path(tmp),
            "raise",
            bounds=bounds,
            segment_size=segment_size,
            before=before,
            batch=batch,
        )


@batch_settings
@example(bounds={"max_bytes": 18}, segment_size=200, before=[b""], batch=[b"\x00", b""])
@given(
    bounds=bounds_strategy, segment_size=segment_sizes, before=small_batches, batch=small_batches
)
def test_add_messages_is_like_add_message_calls_drop_oldest(
    bounds: Dict[str, int], segment_size: int, before: List[bytes], batch: List[bytes]
) -> None:
    with tempfile.TemporaryDirectory(prefix="persizmq-batch-") as tmp:
        _batch_and_calls(
            pathlib.Path(tmp),
            "drop_oldest",
            bounds=bounds,
            segment_size=segment_size,
            before=before,
            batch=batch,
        )


@batch_settings
@example(bounds={"max_bytes": 100}, segment_size=200, before=[b"p" * 51], batch=[b"x" * 40, b"y"])
@given(
    bounds=bounds_strategy, segment_size=segment_sizes, before=small_batches, batch=small_batches
)
def test_add_messages_is_like_add_message_calls_drop_newest(
    bounds: Dict[str, int], segment_size: int, before: List[bytes], batch: List[bytes]
) -> None:
    with tempfile.TemporaryDirectory(prefix="persizmq-batch-") as tmp:
        _batch_and_calls(
            pathlib.Path(tmp),
            "drop_newest",
            bounds=bounds,
            segment_size=segment_size,
            before=before,
            batch=batch,
        )


class _ForgetfulStorage(PersistentStorage):
    """A broken storage: add_messages loses the last message of every batch."""

    def add_messages(
        self,
        msgs: Iterable[Optional[MessageLike]],
        *,
        meta: Optional[Mapping[bytes, bytes]] = None,
    ) -> int:
        batch = [msg for msg in msgs if msg is not None]
        return super().add_messages(batch[:-1], meta=meta) + (1 if batch else 0)


class _ForgetfulModel(StorageModel):
    def _open(self) -> None:
        self.storage = _ForgetfulStorage(
            self.directory, segment_size=self.segment_size, sync="never"
        )


def test_the_model_catches_a_lost_message() -> None:
    """The machine can fail: it finds the message a broken storage loses."""
    case = _ForgetfulModel.TestCase
    case.settings = settings(
        max_examples=100,
        stateful_step_count=10,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    with pytest.raises(AssertionError):
        case().runTest()
