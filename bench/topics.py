"""Topic-store benchmark: the newest message per topic, for 100,000 topics (SPEC section 12).

Three ways to keep the newest message of every topic on disk, side by side in one run:

* ``PersistentTopicStorage`` (``sync="periodic"``): one ``add_message`` per update; also with
  ``add_messages`` in batches of 1,000 (what a ``ThreadedSubscriber`` does with what it drains);
* a file per topic, replaced by an atomic rename per update (``write`` a temporary file,
  ``os.replace``; no fsync, as persizmq 1.0.x's latest storage did);
* SQLite, one table ``topic PRIMARY KEY, message``, ``INSERT OR REPLACE`` per update, each its
  own transaction, in WAL mode with ``synchronous=NORMAL`` (a commit is a ``write(2)`` to the
  WAL; like ``"periodic"``, it survives ``kill -9``).

A round, in a fresh child process per case: create every topic, then update random topics
(100-byte messages) and time it all: updates/s. Then the store is compacted (SQLite: a WAL
checkpoint with ``TRUNCATE``; a file per topic has nothing to compact) and its disk use taken
(allocated blocks, against the live payload: topics x 100 bytes). Then a *second* fresh process
opens it, reads the topic count and one message, and reports the time (warm page cache) and its
memory growth (``VmRSS``). Rounds are interleaved across cases; the table shows medians.

Run: ``python3 bench/topics.py [--quick] [--dir DIR]`` (the anchors' virtualenv is not used:
SQLite is in the standard library).
"""

import os
import pathlib
import random
import sqlite3
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common
from bench._common import Profile, Target, fmt_rate

__all__ = [
    "CASES",
    "LABELS",
    "SIZES",
    "TopicsResult",
    "main",
    "open_case",
    "render",
    "run",
    "targets",
    "update_case",
]

CASES = ("p2", "p2-batch", "files", "sqlite")
LABELS = {
    "p2": 'PersistentTopicStorage add_message ("periodic")',
    "p2-batch": "PersistentTopicStorage add_messages x1,000",
    "files": "a file per topic, atomic rename (1.0.x)",
    "sqlite": "SQLite INSERT OR REPLACE, WAL",
}
MESSAGE_SIZE = 100
BATCH = 1000
TARGET_TOPICS = 100_000
#: Per profile: topics, updates for the fast cases, updates for the slow ones (a file per topic,
#: SQLite: rates are compared, at a size that keeps a round short), rounds.
SIZES: Dict[str, Dict[str, int]] = {
    "full": {"topics": 100_000, "updates": 1_000_000, "slow_updates": 200_000, "rounds": 3},
    # --quick (run_all.py under 90 s): 20,000 topics, so its targets are shown, not judged.
    "quick": {"topics": 20_000, "updates": 100_000, "slow_updates": 20_000, "rounds": 1},
    "smoke": {"topics": 300, "updates": 1_000, "slow_updates": 600, "rounds": 1},
}

#: case -> {"rate": [...], "open": [...], "disk": [...], "apparent": [...], "rss_kib": [...]}
TopicsResult = Dict[str, Any]


def _messages(topics: int, updates: int) -> List[bytes]:
    """Every topic once, then random topics: ``updates`` messages of 100 bytes."""
    rng = random.Random(12)
    out = []
    for i in range(updates):
        topic = b"topic-%06d" % (i if i < topics else rng.randrange(topics))
        out.append(topic + b" " + b"m" * (MESSAGE_SIZE - len(topic) - 1))
    return out


def _allocated(directory: pathlib.Path) -> Dict[str, int]:
    allocated = apparent = 0
    for root, _, names in os.walk(directory):
        for name in names:
            info = os.stat(os.path.join(root, name))
            allocated += info.st_blocks * 512
            apparent += info.st_size
    return {"allocated": allocated, "apparent": apparent}


def _file_name(topic: bytes) -> str:
    return topic.hex() + ".msg"


def _sqlite(directory: pathlib.Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(directory / "latest.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS latest (topic BLOB PRIMARY KEY, message BLOB)")
    return db


def _update_p2(case: str, directory: pathlib.Path, msgs: List[bytes]) -> Dict[str, Any]:
    import persizmq

    storage = persizmq.PersistentTopicStorage(directory)
    start = time.perf_counter()
    if case == "p2":
        add = storage.add_message
        for msg in msgs:
            add(msg)
    else:
        add_many = storage.add_messages
        for first in range(0, len(msgs), BATCH):
            add_many(msgs[first : first + BATCH])
    seconds = time.perf_counter() - start
    compactions = storage.stats().compactions
    before = _allocated(directory)["allocated"]
    started = time.perf_counter()
    storage.compact()
    compact_seconds = time.perf_counter() - started
    topics = len(storage)
    storage.close()
    return {
        "seconds": seconds,
        "compact_seconds": compact_seconds,
        "compactions": compactions,
        "before": before,
        "topics": topics,
    }


def _update_files(directory: pathlib.Path, msgs: List[bytes]) -> Dict[str, Any]:
    start = time.perf_counter()
    for msg in msgs:
        path = directory / _file_name(msg.partition(b" ")[0])
        tmp = str(path) + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, msg)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return {"seconds": time.perf_counter() - start, "compact_seconds": 0.0}


def _update_sqlite(directory: pathlib.Path, msgs: List[bytes]) -> Dict[str, Any]:
    db = _sqlite(directory)
    execute = db.execute
    start = time.perf_counter()
    for msg in msgs:
        execute("INSERT OR REPLACE INTO latest VALUES (?, ?)", (msg.partition(b" ")[0], msg))
    seconds = time.perf_counter() - start
    before = _allocated(directory)["allocated"]
    started = time.perf_counter()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    compact_seconds = time.perf_counter() - started
    db.close()
    return {"seconds": seconds, "compact_seconds": compact_seconds, "before": before}


def update_case(case: str, directory: pathlib.Path, topics: int, updates: int) -> Dict[str, Any]:
    """Build the store of ``case`` in ``directory``; time the updates, then compact and measure."""
    directory.mkdir(parents=True, exist_ok=True)
    msgs = _messages(topics, updates)
    if case in ("p2", "p2-batch"):
        got = _update_p2(case, directory, msgs)
        if got.pop("topics") != topics:
            raise RuntimeError(f"{case}: the store does not hold {topics} topics")
    elif case == "files":
        got = _update_files(directory, msgs)
    elif case == "sqlite":
        got = _update_sqlite(directory, msgs)
    else:
        raise ValueError(f"unknown topic-store case {case!r}")
    return {
        "rate": updates / got.pop("seconds"),
        "updates": updates,
        **got,
        **_allocated(directory),
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_case(case: str, directory: pathlib.Path, topics: int) -> Dict[str, Any]:
    """Open the store of ``case`` as a fresh process would: count the topics, read one."""
    probe = b"topic-%06d" % (topics // 2)
    if case in ("p2", "p2-batch"):
        import persizmq

        rss_before = _rss_kib()
        start = time.perf_counter()
        storage = persizmq.PersistentTopicStorage(directory)
        count = len(storage)
        message = storage.latest(probe)
        seconds = time.perf_counter() - start
        rss = _rss_kib() - rss_before
        storage.close()
    elif case == "files":
        rss_before = _rss_kib()
        start = time.perf_counter()
        count = sum(1 for name in os.listdir(directory) if name.endswith(".msg"))
        with open(directory / _file_name(probe), "rb") as file:
            message = file.read()
        seconds = time.perf_counter() - start
        rss = _rss_kib() - rss_before
    else:
        rss_before = _rss_kib()
        start = time.perf_counter()
        db = _sqlite(directory)
        (count,) = db.execute("SELECT count(*) FROM latest").fetchone()
        row = db.execute("SELECT message FROM latest WHERE topic = ?", (probe,)).fetchone()
        message = row[0]
        seconds = time.perf_counter() - start
        rss = _rss_kib() - rss_before
        db.close()
    if count != topics or not isinstance(message, bytes) or not message.startswith(probe):
        raise RuntimeError(f"{case}: {count} topics, message {message!r}")
    return {"open": seconds, "rss_kib": rss}


def _child(task: str, args: Dict[str, Any]) -> Any:  # noqa: ANN401 (decoded JSON)
    argv = _common.worker_argv(sys.executable, False, task, args)
    return _common.run_json(argv, timeout=1800)


def run(
    profile: Profile, base: Optional[str], progress: Callable[[str], None] = lambda _: None
) -> TopicsResult:
    """Run every case, rounds interleaved; return the measurements."""
    sizes = SIZES[profile.name]
    topics = sizes["topics"]
    result: TopicsResult = {"topics": topics, "cases": {c: {} for c in CASES}}
    for round_no in range(sizes["rounds"]):
        order = CASES[round_no % len(CASES) :] + CASES[: round_no % len(CASES)]
        for case in order:
            updates = sizes["slow_updates"] if case in ("files", "sqlite") else sizes["updates"]
            progress(f"  topics: {case}, round {round_no + 1} of {sizes['rounds']}")
            with _common.scratch_dir(base, f"bench-topics-{case}-") as directory:
                store = directory / "store"
                args = {"case": case, "dir": str(store), "topics": topics}
                built = _child("topics-update", {**args, "updates": updates})
                opened = _child("topics-open", args)
            got = result["cases"][case]
            for key, value in {**built, **opened}.items():
                got.setdefault(key, []).append(value)
    return result


def _med(values: Sequence[float]) -> float:
    return _common.median(values)


def render(result: TopicsResult) -> List[str]:
    """The side-by-side table."""
    topics = result["topics"]
    live = topics * MESSAGE_SIZE
    cases = result["cases"]
    reference = _med(cases["p2"]["rate"])
    rows = []
    for case in CASES:
        got = cases[case]
        rate = _med(got["rate"])
        before = f"{_med(got['before']) / live:.2f}x" if "before" in got else "-"
        rows.append(
            [
                LABELS[case],
                f"{int(_med(got['updates'])):,}",
                fmt_rate(rate),
                f"{rate / reference:.2f}",
                f"{_med(got['open']) * 1000:,.0f} ms",
                f"{_med(got['allocated']) / (1 << 20):,.1f} MiB",
                before,
                f"{_med(got['allocated']) / live:.2f}x",
                f"{_med(got['rss_kib']) / 1024:,.1f} MiB",
            ]
        )
    compactions = int(_med(cases["p2"]["compactions"]))
    rounds = len(cases["p2"]["rate"])
    return [
        f"Topic store: {topics:,} topics, {MESSAGE_SIZE}-byte messages, medians of {rounds} "
        f"round(s); live payload {live / (1 << 20):.1f} MiB",
        *_common.render_table(
            [
                "store",
                "updates",
                "updates/s",
                "x p2",
                "open",
                "disk after",
                "before",
                "after/live",
                "open RSS",
            ],
            rows,
            "lrrrrrrrr",
        ),
        f"'disk after': allocated after compaction (SQLite: WAL checkpoint); 'before': at the end "
        f"of the updates, against the live payload. PersistentTopicStorage compacted "
        f"{compactions} time(s) in the background during the {int(_med(cases['p2']['updates'])):,} "
        f"updates; the final compact() took {_med(cases['p2']['compact_seconds']) * 1000:,.0f} ms. "
        f"'open RSS': the memory an open store holds (the index: "
        f"{_med(cases['p2']['rss_kib']) * 1024 / topics:,.0f} bytes per topic).",
    ]


def targets(result: TopicsResult) -> List[Target]:
    """SPEC section 12: 100,000 topics, >= 200,000 updates/s, open < 1 s, disk <= 2x live."""
    topics = result["topics"]
    full = topics >= TARGET_TOPICS
    note = "" if full else f" (only {topics:,} topics)"
    got = result["cases"]["p2"]
    rate = _med(got["rate"])
    opened = _med(got["open"])
    ratio = _med(got["allocated"]) / (topics * MESSAGE_SIZE)
    sqlite_rate = _med(result["cases"]["sqlite"]["rate"])
    return [
        Target(
            "topic store: updates/s (add_message)",
            ">= 200,000/s",
            f"{fmt_rate(rate)}/s ({rate / sqlite_rate:.1f}x SQLite){note}",
            (rate >= 200_000) if full else None,
        ),
        Target(
            "topic store: open 100,000 topics",
            "< 1 s",
            f"{opened * 1000:,.0f} ms{note}",
            (opened < 1.0) if full else None,
        ),
        Target(
            "topic store: disk after compaction",
            "<= 2x live data",
            f"{ratio:.2f}x{note}",
            (ratio <= 2.0) if full else None,
        ),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the topic-store benchmark alone and print its table and targets."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    _common.add_arguments(parser)
    args = parser.parse_args(argv)
    profile = _common.PROFILES[args.profile]
    result = run(profile, args.dir, lambda line: print(line, file=sys.stderr, flush=True))
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
