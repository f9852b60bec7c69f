"""The C extension of the lean paths (``persizmq/_engine/_speedups.c``) against its Python
reference (``persizmq/_engine/_lean.py``).

The record loops are compared output for output on random records, damage included; the lean
paths themselves run under both implementations in the model, lean-path and interrupt tests
(the ``lean_impl`` fixture).
"""

import os
import subprocess
import sys
import zlib
from typing import Callable, List, Tuple

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from persizmq._engine import _format, _lean
from persizmq._message import Message

try:
    from persizmq._engine import _speedups
except ImportError:  # pragma: no cover - where the extension is not built
    _speedups = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(
    _speedups is None and not os.environ.get("PERSIZMQ_REQUIRE_SPEEDUPS"),
    reason="the C extension persizmq._engine._speedups is not built",
)

records_st = st.lists(
    st.tuples(
        st.binary(max_size=300), st.sampled_from([_format.KIND_SINGLE, _format.KIND_MULTIPART])
    ),
    max_size=30,
)
salts = st.integers(min_value=0, max_value=0xFFFFFFFF)
indexes = st.integers(min_value=0, max_value=_format.MAX_INDEX - 40)


def test_the_extension_is_in_use_where_it_is_required() -> None:
    # CI sets PERSIZMQ_REQUIRE_SPEEDUPS (.ci/run): a build that silently fell back to Python
    # would measure (and test) the wrong thing.
    if not os.environ.get("PERSIZMQ_REQUIRE_SPEEDUPS"):
        pytest.skip("PERSIZMQ_REQUIRE_SPEEDUPS is not set")
    assert _speedups is not None
    assert _lean.IMPLEMENTATION == "C"


def test_pure_python_is_chosen_by_the_environment() -> None:
    code = "from persizmq._engine import _lean; print(_lean.IMPLEMENTATION)"
    env = dict(os.environ, PERSIZMQ_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "Python"


@needs_c
@settings(max_examples=200, deadline=None)
@given(records=records_st, salt=salts, index=indexes)
def test_encode_records_is_the_reference(
    records: List[Tuple[bytes, int]], salt: int, index: int
) -> None:
    got = _speedups.encode_records(records, salt, index)
    assert got == _lean.py_encode_records(records, salt, index)
    # ... and each record is what _format.encode_record makes of it.
    want = b"".join(
        _format.encode_record(payload, kind, salt, index + i)
        for i, (payload, kind) in enumerate(records)
    )
    assert got == want


@needs_c
def test_encode_records_refuses_what_is_not_a_record() -> None:
    with pytest.raises(TypeError, match=r"\(bytes, int\)"):
        _speedups.encode_records([("text", 1)], 1, 0)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list"):
        _speedups.encode_records(((b"x", 1),), 1, 0)  # type: ignore[arg-type]


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    records=records_st,
    salt=salts,
    index=indexes,
    lead=st.integers(min_value=0, max_value=64),
    damage=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    budget_back=st.integers(min_value=0, max_value=400),
    count=st.integers(min_value=0, max_value=40),
    index_shift=st.sampled_from([0, 0, 0, 1, -1]),
)
def test_read_run_is_the_reference(  # noqa: PLR0917 (one draw per knob)
    records: List[Tuple[bytes, int]],
    salt: int,
    index: int,
    lead: int,
    damage: "Tuple[int, int] | None",
    cut: "int | None",
    budget_back: int,
    count: int,
    index_shift: int,
) -> None:
    body = bytearray(bytes(lead) + _lean.py_encode_records(records, salt, index) + bytes(20))
    if damage is not None and body:
        at, flip = damage
        body[at % len(body)] ^= flip
    limit = len(body) if cut is None else cut % (len(body) + 1)
    data = bytes(body)
    budget = max(lead, limit - budget_back)
    start_index = max(0, index + index_shift)
    want_msgs: List[Message] = []
    want_ends: List[int] = []
    want = _lean.py_read_run(
        data, lead, start_index, limit, budget, salt, count, want_msgs, want_ends
    )
    got_msgs: List[Message] = []
    got_ends: List[int] = []
    got = _speedups.read_run(
        data, lead, start_index, limit, budget, salt, count, got_msgs, got_ends
    )
    assert got == want
    assert got_msgs == want_msgs
    assert got_ends == want_ends
    assert all(type(m) is bytes for m in got_msgs)


@needs_c
def test_read_run_checks_the_crc_with_zlib() -> None:
    # One record by hand: the CRC is zlib.crc32 seeded with the header's mix (SPEC 4).
    salt, index, payload = 0x12345678, 7, b"hello"
    tag = _format.KIND_SINGLE << _format.KIND_SHIFT | index
    crc = zlib.crc32(payload, _format.record_seed(salt, tag, len(payload)))
    good = _format.pack_record_header(salt, tag, len(payload), crc) + payload
    msgs: List[Message] = []
    ends: List[int] = []
    assert _speedups.read_run(good, 0, index, len(good), len(good), salt, 5, msgs, ends) == (
        len(good),
        index + 1,
        1,
    )
    assert msgs == [payload]
    bad = _format.pack_record_header(salt, tag, len(payload), crc ^ 1) + payload
    assert _speedups.read_run(bad, 0, index, len(bad), len(bad), salt, 5, [], []) == (0, index, 0)


@needs_c
def test_the_crc_is_zlibs_at_every_length_and_alignment() -> None:
    # The extension computes the CRC itself where it can (FAST_CRC: carry-less multiplication
    # on x86-64); every record must still carry zlib.crc32's value.
    text = os.urandom(9000)
    salt = 0x0BADCAFE
    lengths = [*range(300), 511, 512, 513, 1023, 1024, 4095, 4096, 4097, 8191, 8192]
    for start in (0, 1, 3, 8, 15):
        for n in lengths:
            payload = text[start : start + n]
            got = _speedups.encode_records([(payload, _format.KIND_SINGLE)], salt, n)
            assert got == _format.encode_record(payload, _format.KIND_SINGLE, salt, n), (start, n)
            msgs: List[Message] = []
            assert _speedups.read_run(got, 0, n, len(got), len(got), salt, 1, msgs, [])[2] == 1
            assert msgs == [payload]


class _Bytes(bytes):
    """A bytes subclass: not a plain message for the batch's quick path."""


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    msgs=st.lists(
        st.one_of(
            st.binary(max_size=50),
            st.binary(max_size=50),
            st.none(),
            st.text(max_size=3),
            st.binary(max_size=5).map(_Bytes),
            st.binary(max_size=5).map(bytearray),
        ),
        max_size=20,
    ),
    limit=st.integers(min_value=0, max_value=60),
    as_tuple=st.booleans(),
)
def test_plain_records_and_records_size_are_the_reference(
    msgs: List[object], limit: int, as_tuple: bool
) -> None:
    batch: object = tuple(msgs) if as_tuple else msgs
    got = _speedups.plain_records(batch, limit)
    want = _lean.py_plain_records(batch, limit)
    assert got == want
    if got is not None:
        assert all(type(payload) is bytes and kind == 1 for payload, kind in got)
        assert _speedups.records_size(got) == _lean.py_records_size(got)
    assert _speedups.plain_records(iter([b"x"]), 10) is None  # only lists and tuples


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=700),
    start=st.integers(min_value=0, max_value=800),
    end=st.integers(min_value=0, max_value=800),
    seed=salts,
)
def test_crc32_range_is_zlib_of_the_slice(data: bytes, start: int, end: int, seed: int) -> None:
    assert _speedups.crc32_range(data, start, end, seed) == zlib.crc32(data[start:end], seed)
    assert _format.py_crc32_range(data, start, end, seed) == zlib.crc32(data[start:end], seed)
    with pytest.raises(ValueError, match="0 <= start"):
        _speedups.crc32_range(data, -1, end, seed)


class _Interrupt(BaseException):
    """What the test's signal handler raises, as KeyboardInterrupt."""


def _then_a_check(call: Callable[[], object]) -> None:
    call()
    for _ in range(1000):  # a pending signal handler runs at the loop's next check
        pass


@needs_c
def test_run_uninterrupted_lets_a_signal_in_only_after_the_step() -> None:
    import signal
    import threading

    steps: List[str] = []

    def handler(_sig: int, _frame: object) -> None:
        raise _Interrupt

    def step() -> str:
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the step runs
        total = 0
        for i in range(20_000):  # bytecode: a plain call would be interrupted in here
            total += i
        steps.append(f"done {total}")
        return "result"

    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(_Interrupt):
            _then_a_check(lambda: _lean.uninterrupted(step))
        assert steps == [f"done {sum(range(20_000))}"]
        # A plain call is cut in the middle: what the C step protects against.
        steps.clear()
        with pytest.raises(_Interrupt):
            _then_a_check(step)
        assert steps == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


@needs_c
def test_run_uninterrupted_returns_and_raises_what_the_step_does() -> None:
    assert _speedups.run_uninterrupted(lambda: 42) == 42

    def fails() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        _speedups.run_uninterrupted(fails)
