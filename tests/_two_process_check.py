"""The rules of the two-process crash suite, checked on the logs of its children.

The log formats are those of ``_two_process_child``. Every rule raises :class:`RuleError`
naming the first event that breaks it:

* **no phantom**: everything delivered is a message of this run, byte for byte (the consumer
  logs ``bad`` otherwise), with a number the publisher or producer announced;
* **order kept**: the numbers delivered only increase — except that the first delivery of a
  consumer incarnation may repeat the one message the previous one had in hand (``d N``
  logged, ``p N`` not), at least once;
* **nothing popped comes back**: a number logged ``p`` is never delivered again;
* **nothing acknowledged lost** (producer variant): every number of a ``k`` line is delivered
  or still pending at the end; of an add in flight when the producer died, an atomic batch is
  all there or not at all, a plain batch keeps a prefix (the rest is a torn tail), and the
  metadata the next producer finds is that of the last atomic batch that is there;
* **the union is consistent**: what the final consumer drains continues the consumer's history
  by the same rules.
"""

import dataclasses
import pathlib
from typing import Dict, List, Optional, Set, Tuple

__all__ = [
    "ConsumerHistory",
    "ProducerSummary",
    "RuleError",
    "check_consumer",
    "check_final",
    "check_producer",
    "publisher_limit",
    "read_log",
]


class RuleError(AssertionError):
    """A rule of the crash suite was broken (the message says which and where)."""


def read_log(path: pathlib.Path) -> List[List[bytes]]:
    """The lines of a child's log, split into fields; a torn last line is ignored."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [line.split(b" ") for line in lines[:-1]]


def publisher_limit(lines: List[List[bytes]]) -> int:
    """One past the highest number the publisher announced (its bursts are contiguous from 0)."""
    end = 0
    for fields in lines:
        start, stop = int(fields[1]), int(fields[2])
        if start != end:
            raise RuleError(f"publisher log: burst {start}..{stop} does not follow {end}")
        end = stop
    return end


@dataclasses.dataclass
class ConsumerHistory:
    """What the consumer's log says happened."""

    #: Numbers delivered (``front()`` returned them), in order, re-deliveries included.
    delivered: List[int] = dataclasses.field(default_factory=list)
    #: Numbers whose ``pop_front()`` returned.
    popped: Set[int] = dataclasses.field(default_factory=set)
    #: The number delivered last whose pop was not logged (the message in hand), if any.
    in_hand: Optional[int] = None
    #: The highest number delivered (-1: none).
    highest: int = -1
    #: Consumer processes that opened the storage.
    incarnations: int = 0
    #: Deliveries that repeated the message a killed consumer had in hand.
    redelivered: int = 0


def _check_number(where: str, i: int, limit: int) -> None:
    if not 0 <= i < limit:
        raise RuleError(f"{where}: phantom: message {i} was never sent (numbers sent: 0..{limit})")


def _deliver(history: ConsumerHistory, i: int, first: bool, where: str, limit: int) -> None:
    """Apply the rules to the delivery of ``i`` (``first``: of a new consumer incarnation)."""
    _check_number(where, i, limit)
    if i in history.popped:
        raise RuleError(f"{where}: message {i} came back after its pop_front() returned")
    if first and i == history.in_hand:
        history.redelivered += 1
    elif i <= history.highest:
        raise RuleError(
            f"{where}: order broken: message {i} delivered after {history.highest}"
            + (f" (the message in hand was {history.in_hand})" if first else "")
        )
    history.highest = max(history.highest, i)
    history.in_hand = i
    history.delivered.append(i)


def check_consumer(lines: List[List[bytes]], limit: int) -> ConsumerHistory:
    """Check the consumer's log against the rules; ``limit``: one past the highest number sent."""
    history = ConsumerHistory()
    first = False
    for lineno, fields in enumerate(lines, 1):
        where = f"consumer log line {lineno}"
        event = fields[0]
        if event == b"s":
            history.incarnations += 1
            first = True
        elif event == b"bad":
            raise RuleError(
                f"{where}: phantom: front() returned {int(fields[1])} bytes that are not a "
                f"message that was sent: {bytes.fromhex(fields[2].decode())!r}"
            )
        elif event == b"x":
            raise RuleError(
                f"{where}: pop_front() returned False after front() returned {fields[1]!r}"
            )
        elif event == b"d":
            if not first and history.in_hand is not None:
                raise RuleError(
                    f"{where}: delivered {fields[1]!r} before popping {history.in_hand}"
                )
            _deliver(history, int(fields[1]), first, where, limit)
            first = False
        elif event == b"p":
            i = int(fields[1])
            if i != history.in_hand:
                raise RuleError(
                    f"{where}: popped {i}, but the message in hand was {history.in_hand}"
                )
            history.popped.add(i)
            history.in_hand = None
        else:
            raise RuleError(f"{where}: unknown event {b' '.join(fields)!r}")
    return history


def check_final(history: ConsumerHistory, final: List[int], limit: int) -> Set[int]:
    """Check what the final consumer drained against the history; return every number that was
    ever delivered or drained (the union)."""
    for index, i in enumerate(final):
        _deliver(history, i, index == 0, f"final drain, message #{index}", limit)
    return set(history.delivered)


@dataclasses.dataclass
class ProducerSummary:
    """What the producer's log says, checked against the union."""

    #: Producer processes that opened the storage.
    incarnations: int = 0
    #: Numbers whose add returned (acknowledged).
    acknowledged: int = 0
    #: Adds in flight when a producer was killed (intent logged, return not).
    in_flight: int = 0
    #: Numbers of in-flight adds that are there all the same.
    in_flight_kept: int = 0
    #: One past the highest number the producer announced.
    limit: int = 0
    #: Producer incarnations that found other metadata than the last atomic batch stored
    #: (only counted, not raised, when ``check_producer(check_meta=False)``).
    meta_lost: List[str] = dataclasses.field(default_factory=list)


#: An add the producer announced: ``(start, stop, kind, acknowledged)``.
_Intent = Tuple[int, int, bytes, bool]


def _parse_producer(lines: List[List[bytes]]) -> Tuple[List[_Intent], List[Tuple[int, bytes]]]:
    """The producer's adds, and each incarnation's ``(index of its first add, metadata found)``."""
    intents: List[_Intent] = []
    starts: List[Tuple[int, bytes]] = []
    pending: Optional[Tuple[int, int, bytes]] = None
    end = 0
    for lineno, fields in enumerate(lines, 1):
        where = f"producer log line {lineno}"
        event = fields[0]
        if event in (b"s", b"a") and pending is not None:
            intents.append((*pending, False))  # the add in flight when the producer died
            pending = None
        if event == b"s":
            starts.append((len(intents), fields[1]))
        elif event == b"a":
            start, stop = int(fields[1]), int(fields[2])
            if start != end:
                raise RuleError(f"{where}: add {start}..{stop} does not follow {end}")
            pending, end = (start, stop, fields[3]), stop
        elif event == b"k":
            if pending is None or (int(fields[1]), int(fields[2])) != pending[:2]:
                raise RuleError(f"{where}: acknowledges {fields[1:]!r}, but the add was {pending}")
            intents.append((*pending, True))
            pending = None
        else:
            raise RuleError(f"{where}: unknown event {b' '.join(fields)!r}")
    if pending is not None:
        intents.append((*pending, False))
    return intents, starts


def check_producer(
    lines: List[List[bytes]], union: Set[int], check_meta: bool = True
) -> ProducerSummary:
    """Check the producer's adds against ``union``, everything ever delivered or drained; with
    ``check_meta`` False a wrong ``writer_meta()`` is only listed in the summary."""
    intents, starts = _parse_producer(lines)
    summary = ProducerSummary(incarnations=len(starts))
    summary.limit = intents[-1][1] if intents else 0
    for start, stop, kind, acked in intents:
        kept = [i for i in range(start, stop) if i in union]
        if acked:
            summary.acknowledged += stop - start
            if len(kept) != stop - start:
                lost = sorted(set(range(start, stop)) - set(kept))
                raise RuleError(
                    f"acknowledged add lost: {kind.decode()} {start}..{stop} returned, but "
                    f"{len(lost)} of its messages were never delivered nor pending: {lost[:10]}"
                )
            continue
        summary.in_flight += 1
        summary.in_flight_kept += len(kept)
        whole = kind in (b"1", b"m")
        if kept != list(range(start, start + len(kept))) or (
            whole and 0 < len(kept) < stop - start
        ):
            shape = "all or nothing" if whole else "a prefix"
            raise RuleError(
                f"the add {kind.decode()} {start}..{stop} in flight when the producer died kept "
                f"{kept[:10]}..., expected {shape}"
            )
    summary.meta_lost = _check_meta(intents, starts, union)
    if summary.meta_lost and check_meta:
        raise RuleError(summary.meta_lost[0])
    return summary


def _check_meta(
    intents: List[_Intent], starts: List[Tuple[int, bytes]], union: Set[int]
) -> List[str]:
    """Whether each producer found the metadata of the last atomic batch that is there before
    it: what went wrong, one line per incarnation."""
    last_kept: Dict[int, bytes] = {}  # index of an add -> metadata after the adds before it
    meta = b"-"
    for index, (start, stop, kind, _) in enumerate(intents):
        last_kept[index] = meta
        if kind == b"m" and start in union:
            meta = b"%d" % stop
    last_kept[len(intents)] = meta
    return [
        f"producer incarnation {number} found writer_meta() last={found!r}, expected "
        f"{last_kept[index]!r} (the last atomic batch stored before it)"
        for number, (index, found) in enumerate(starts, 1)
        if found != last_kept[index]
    ]
