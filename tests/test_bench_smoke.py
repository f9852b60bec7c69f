"""Smoke test of bench/: the persizmq 3 parts of every benchmark run at a tiny size.

No anchors' virtualenv is created and nothing is timed or compared: this only keeps the
benchmark scripts from rotting as the library changes.
"""

import pathlib
from typing import List

from bench import (
    _burst_child,
    _common,
    burst,
    end_to_end,
    receive_cost,
    redis_stream,
    run_all,
    scale,
    storage,
    topics,
)
from bench import aio as aio_bench
from tests._redis_server import Server


def test_storage_cases_in_process(tmp_path: pathlib.Path) -> None:
    for case in storage.P2_CASES:
        directory = tmp_path / case
        rates = storage.measure_case(case, 100, 40, 20, directory)
        assert rates["add"] is not None
        assert rates["add"] > 0
        assert (rates["consume"] is None) == (case == "p2-batch")


def test_run_all_smoke(tmp_path: pathlib.Path) -> None:
    lines: List[str] = []
    code = run_all.main(["--smoke", "--no-anchors", "--dir", str(tmp_path)], out=lines.append)
    assert code == 0
    report = "\n".join(lines)
    for expected in (
        "CPU:",
        "fdatasync",
        'persizmq 3 sync="periodic"',
        'persizmq 3 "always" add_messages',
        "highest lossless rate, bare pyzmq loop",
        "highest lossless rate, persizmq 3",
        "persizmq 3, 3,000 pending",
        "VmRSS",
        "SPEC 7 target",
        "end to end lossless",
        "Bursts:",
        "burst capture, persizmq record",
        "CPU per message of the receive paths",
        "Redis Streams",
        "asyncio: consuming a durable backlog",
        "AsyncQueue async for, sync=always",
        "producer in another process (polling)",
        "Topic store: 300 topics",
        "SQLite INSERT OR REPLACE",
        "topic store: open 100,000 topics",
        "Store and forward: 100-byte messages",
        "bare DEALER -> ROUTER loop",
        "acknowledged transport, 100 B, periodic",
    ):
        assert expected in report, expected
    assert "persizmq 1.0.3 loss" not in report  # no anchors were asked for
    # Every scratch directory was removed again.
    assert list(tmp_path.iterdir()) == []


def test_end_to_end_counts_everything_at_a_low_rate(tmp_path: pathlib.Path) -> None:
    got = end_to_end.trial("p2", 2000, 200, str(tmp_path))
    assert got["n"] == 200
    # Whatever arrived was persisted (no timing assertion: the machine may be busy).
    assert got["persisted"] == got["received"] <= 200
    assert got["errors"] == 0


def test_highest_lossless_and_targets() -> None:
    result: end_to_end.E2EResult = {
        "bare": {1000: [{"loss": 0.0}], 2000: [{"loss": 0.0}], 3000: [{"loss": 1.0}]},
        "p2": {1000: [{"loss": 0.0}], 2000: [{"loss": 0.5}], 3000: [{"loss": 0.0}]},
    }
    assert end_to_end.highest_lossless(result["bare"]) == 2000
    assert end_to_end.highest_lossless(result["p2"]) == 1000
    (target,) = end_to_end.targets(result)
    assert target.met is False


def test_burst_trials_count_what_arrived(tmp_path: pathlib.Path) -> None:
    for kind in burst.KINDS:
        got = burst.trial(kind, 2000, 500, 0.01, str(tmp_path))
        assert got["n"] == 2000
        assert 0 < got["captured"] <= 2000, (kind, got)  # no timing assertion: a busy machine
        assert got["errors"] == []
    assert list(tmp_path.iterdir()) == []


def test_burst_ratios_and_targets() -> None:
    result = burst.BurstResult(
        {
            "bare": [{"captured": 100}, {"captured": 200}],
            "record": [{"captured": 95}, {"captured": 100}],
            "p2": [{"captured": 100}, {"captured": 220}],
        }
    )
    assert burst.ratios(result, "record") == [0.95, 0.5]
    record, p2 = burst.targets(result)
    assert record.met is False  # median 0.725
    assert p2.met is True  # median 1.05


def test_burst_p2_sizes_its_socket_as_record_does() -> None:
    from persizmq._cli import _record

    assert (_burst_child.P2_RCVHWM, _burst_child.P2_RCVBUF) == (
        _record.RECORD_RCVHWM_TCP,
        _record.RECORD_RCVBUF,
    )
    assert _burst_child.P2_BIG_RCVHWM == _record.RECORD_RCVHWM


def test_receive_costs() -> None:
    costs = receive_cost.measure(500)
    assert set(costs) == set(receive_cost.PATHS)
    assert all(micros > 0 for micros in costs.values())


def test_scale_helpers(tmp_path: pathlib.Path) -> None:
    scale.build_p2(tmp_path / "q", 500, 100)
    opened = scale.time_opens("p2", tmp_path / "q", 1)
    assert opened["pending"] == 500
    scale.build_v1(tmp_path / "v1", 5)
    assert scale.disk_use(tmp_path / "v1")["files"] == 5
    rss = scale.record_rss(tmp_path / "rss", 300, [100, 300])
    assert [count for count, _ in rss["samples"]] == [0, 100, 300]


def test_machine_description_and_tables() -> None:
    lines = _common.machine_description(None)
    assert any(line.startswith("CPU:") for line in lines)
    table = _common.render_table(["a", "b"], [["1", "22"]], "lr")
    assert table == ["a   b", "-  --", "1  22"]


def test_redis_stream_cases(redis_server: Server) -> None:
    for case in redis_stream.CASES:
        assert redis_stream.measure(case, redis_server.url, 100) > 0


def test_aio_rounds(tmp_path: pathlib.Path) -> None:
    for case in aio_bench.CONSUME_CASES:
        for drain in aio_bench.DRAINS:
            assert aio_bench.consume_round(case, drain, 30, tmp_path / f"{case}-{drain}") > 0
    for case in aio_bench.LATENCY_CASES:
        samples = aio_bench.latency_round(case, 3, tmp_path / case.replace(" ", "_"))
        assert len(samples) == 3
        assert all(s > 0 for s in samples)


def test_topic_store_cases(tmp_path: pathlib.Path) -> None:
    for case in topics.CASES:
        built = topics.update_case(case, tmp_path / case, 50, 200)
        assert built["rate"] > 0
        assert built["allocated"] > 0
        opened = topics.open_case(case, tmp_path / case, 50)
        assert opened["open"] > 0
