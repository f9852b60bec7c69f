"""Child-process entry point of the benchmarks.

``python bench/_worker.py ROLE TASK JSON_ARGS`` runs one task and prints its result as JSON on
the last line of stdout. ROLE ``repo`` puts the repository first on ``sys.path`` (persizmq 3);
ROLE ``anchors`` is for the anchors' virtualenv: the repository goes *last*, so that
``import persizmq`` finds the virtualenv's persizmq 1.0.3 while ``import bench`` still works.
The directory of this file is taken off ``sys.path`` either way, so no module of ``bench/``
can shadow a library.
"""

import json
import os
import pathlib
import sys
from typing import Any, Callable, Dict, List


def _set_path(role: str) -> None:
    here = pathlib.Path(__file__).resolve().parent
    root = str(here.parent)
    sys.path[:] = [p for p in sys.path if not p or pathlib.Path(p).resolve() != here]
    if role == "anchors":
        sys.path.append(root)
    else:
        sys.path.insert(0, root)


def _versions() -> Dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("persizmq", "queuelib", "persist-queue", "diskcache", "pyzmq"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _storage(args: Dict[str, Any]) -> object:
    from bench import storage

    cases = [(str(c), int(s), int(n)) for c, s, n in args["cases"]]
    return storage.run_cases(cases, int(args["batch"]), args["dir"])


def _publish(args: Dict[str, Any]) -> object:
    from bench import end_to_end

    return end_to_end.publish(int(args["n"]), float(args["rate"]), int(args["size"]))


def _receive(args: Dict[str, Any]) -> object:
    from bench import end_to_end

    return end_to_end.receive(
        str(args["kind"]),
        endpoint=str(args["endpoint"]),
        n=int(args["n"]),
        directory=pathlib.Path(args["dir"]),
        quiet=float(args["quiet"]),
        timeout=float(args["timeout"]),
    )


def _burst_publish(args: Dict[str, Any]) -> object:
    from bench import _burst_child

    return _burst_child.publish(
        int(args["n"]), int(args["burst"]), float(args["pause"]), int(args["size"])
    )


def _burst_receive(args: Dict[str, Any]) -> object:
    from bench import _burst_child

    return _burst_child.receive(
        str(args["kind"]),
        endpoint=str(args["endpoint"]),
        n=int(args["n"]),
        directory=pathlib.Path(args["dir"]),
        quiet=float(args["quiet"]),
        timeout=float(args["timeout"]),
    )


def _receive_cost(args: Dict[str, Any]) -> object:
    from bench import receive_cost

    return receive_cost.measure(int(args["n"]))


def _scale_build(args: Dict[str, Any]) -> object:
    from bench import scale

    return scale.build_p2(pathlib.Path(args["dir"]), int(args["n"]), int(args["batch"]))


def _scale_open(args: Dict[str, Any]) -> object:
    from bench import scale

    return scale.time_opens(str(args["which"]), pathlib.Path(args["dir"]), int(args["opens"]))


def _rss(args: Dict[str, Any]) -> object:
    from bench import scale

    checkpoints: List[int] = [int(c) for c in args["checkpoints"]]
    return scale.record_rss(pathlib.Path(args["dir"]), int(args["n"]), checkpoints)


def _topics_update(args: Dict[str, Any]) -> object:
    from bench import topics

    directory = pathlib.Path(args["dir"])
    return topics.update_case(
        str(args["case"]), directory, int(args["topics"]), int(args["updates"])
    )


def _topics_open(args: Dict[str, Any]) -> object:
    from bench import topics

    return topics.open_case(str(args["case"]), pathlib.Path(args["dir"]), int(args["topics"]))


_TASKS: Dict[str, Callable[[Dict[str, Any]], object]] = {
    "versions": lambda _: _versions(),
    "storage": _storage,
    "publish": _publish,
    "receive": _receive,
    "burst-publish": _burst_publish,
    "burst-receive": _burst_receive,
    "receive-cost": _receive_cost,
    "scale-build": _scale_build,
    "scale-open": _scale_open,
    "rss": _rss,
    "topics-update": _topics_update,
    "topics-open": _topics_open,
}


def main(argv: List[str]) -> int:
    """Run the task named in ``argv`` (see the module docstring) and print its JSON result."""
    if len(argv) != 3 or argv[0] not in ("repo", "anchors"):
        print("usage: _worker.py repo|anchors TASK JSON_ARGS", file=sys.stderr)
        return 2
    role, task, raw = argv
    if task not in _TASKS:
        print(f"unknown task {task!r}; known: {', '.join(_TASKS)}", file=sys.stderr)
        return 2
    _set_path(role)
    result = _TASKS[task](json.loads(raw))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave at once: a receiver's background threads (1.0.3's are not daemons) must not keep
    # the process alive, and nothing is left to clean up.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
