"""The sequence counters of ``record --sequence-frame N``: kept in the directory for ``stats``.

Theory of operation
===================

A recorder with ``--sequence-frame`` counts gaps in the publishers' sequence numbers
(:class:`persizmq.ThreadedSubscriber`, ``sequence_frame``). So that ``persizmq stats`` shows
them -- while it records and after it stopped -- it writes them to ``DIR/sequence-stats.json``
with every status line and when it stops: written to a temporary file and renamed over the old
one, so a reader sees a whole old or a whole new file (a foreign entry for the storage, which
leaves it alone). The file holds the totals and every topic's counters, including the last
number seen, and a restarted recorder goes on from them: a restart then counts as missing what
was published while no recorder listened, not what the previous run had already stored. After a
crash the file is at most one status interval old, so the restarted recorder may count as
missing some messages that the dead one had in fact stored.

Topics are bytes; in the JSON they are strings of the same code points (``latin-1``), which
maps every byte string to a string and back.
"""

import contextlib
import json
import os
import pathlib
import time
from typing import Any, Dict, List, Optional, Tuple

import persizmq
from persizmq._cli._output import iso

__all__ = ["SEQUENCE_FILE", "describe", "load", "save", "status_fields", "summary"]

SEQUENCE_FILE = "sequence-stats.json"
_FORMAT = 1
_COUNTERS = ("gaps", "missing", "duplicates", "restarts", "malformed")


def save(directory: pathlib.Path, sequence_frame: int, stats: persizmq.SequenceStats) -> None:
    """Write the counters to ``DIR/sequence-stats.json`` (atomically, by rename)."""
    data: Dict[str, Any] = {
        "format": _FORMAT,
        "sequence_frame": sequence_frame,
        "updated": time.time(),
        **{name: getattr(stats, name) for name in _COUNTERS},
        "topics": {
            topic.decode("latin-1"): [
                t.last,
                t.received,
                t.gaps,
                t.missing,
                t.duplicates,
                t.restarts,
                t.malformed,
            ]
            for topic, t in stats.topics.items()
        },
    }
    path = directory / SEQUENCE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


def load(directory: pathlib.Path) -> Optional[Tuple[int, float, persizmq.SequenceStats]]:
    """Read ``DIR/sequence-stats.json``: ``(sequence_frame, updated, stats)``, or None if there
    is none (or it cannot be read: a file damaged by a power cut is started afresh)."""
    try:
        data = json.loads((directory / SEQUENCE_FILE).read_text(encoding="utf-8"))
        topics = {
            key.encode("latin-1"): persizmq.TopicSequenceStats(*map(int, values))
            for key, values in data["topics"].items()
        }
        stats = persizmq.SequenceStats(
            **{name: int(data[name]) for name in _COUNTERS}, topics=topics
        )
        return int(data["sequence_frame"]), float(data["updated"]), stats
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def status_fields(stats: persizmq.SequenceStats) -> Dict[str, int]:
    """The counters for the recorder's status line."""
    return {name: getattr(stats, name) for name in _COUNTERS}


def summary(directory: pathlib.Path) -> Optional[Dict[str, Any]]:
    """The counters for ``persizmq stats`` (``None`` without a counter file)."""
    found = load(directory)
    if found is None:
        return None
    sequence_frame, updated, stats = found
    worst: List[Tuple[int, bytes]] = sorted(
        ((t.missing, topic) for topic, t in stats.topics.items() if t.missing), reverse=True
    )
    return {
        "sequence_frame": sequence_frame,
        **status_fields(stats),
        "topics": len(stats.topics),
        "most_missing": [
            {"topic": topic.decode("latin-1"), "missing": missing} for missing, topic in worst[:5]
        ],
        "updated": iso(updated),
    }


def describe(info: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The rows of ``persizmq stats`` for the counters of :func:`summary`."""
    rows = [
        (
            "sequence",
            f"frame {info['sequence_frame']}: {info['gaps']:,} gaps, {info['missing']:,} missing, "
            f"{info['duplicates']:,} duplicates, {info['restarts']:,} restarts, "
            f"{info['malformed']:,} malformed, over {info['topics']:,} topics "
            f"(as of {info['updated']})",
        )
    ]
    with contextlib.suppress(KeyError):
        worst = ", ".join(
            f"{entry['topic'].encode('latin-1')!r} {entry['missing']:,}"
            for entry in info["most_missing"]
        )
        if worst:
            rows.append(("most missing", worst))
    return rows
