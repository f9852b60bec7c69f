"""Security review as tests: no code loaded from disk, no world-writable files, no paths from
message content.

* The package source (parsed, so comments and docstrings that *mention* pickle do not count)
  imports no deserialiser that runs code (``pickle``, ``marshal``, ``shelve``, ...) and calls no
  ``eval``/``exec``/``compile``/``__import__``.
* Files and directories that persizmq creates have no world-writable bit, even under umask 0
  (checked in a child process, since the umask is process-wide).
* Messages whose bytes look like paths (``../../x``, absolute paths, NUL bytes) create nothing
  outside the storage directory, and inside it only the documented names.
"""

import ast
import json
import pathlib
import re
import stat
import subprocess
import sys
import textwrap
from typing import Dict, List, Set

import pytest

import persizmq
import persizmq.filter
from tests._reliab_util import drain

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "persizmq"

FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "jsonpickle",
    "yaml",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}


def sources() -> List[pathlib.Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8, files
    return files


def call_problems(node: ast.Call) -> List[str]:
    """What is wrong with a call: eval/exec/compile/__import__, deserialisers, shell=True."""
    problems = []
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    owner = ""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = func.value.id
    if name in FORBIDDEN_CALLS and (isinstance(func, ast.Name) or owner == "builtins"):
        problems.append(f"line {node.lineno}: call of {name}()")  # re.compile() is fine
    if name in {"import_module", "load", "loads"} and owner in FORBIDDEN_MODULES | {"importlib"}:
        problems.append(f"line {node.lineno}: call of {owner}.{name}()")
    problems.extend(
        f"line {node.lineno}: shell=..."
        for keyword in node.keywords
        if keyword.arg == "shell"
        and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
    )
    return problems


def code_problems(tree: ast.AST) -> List[str]:
    """Imports of code-loading deserialisers, and the calls of :func:`call_problems`."""
    problems: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems.extend(
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] in FORBIDDEN_MODULES
            )
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            problems.extend(call_problems(node))
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_MODULES:
            problems.append(f"line {node.lineno}: use of {node.id}")
    return problems


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.name)
def test_no_code_loading_deserialisers_or_eval(path: pathlib.Path) -> None:
    problems = code_problems(ast.parse(path.read_text(), str(path)))
    assert not problems, f"{path.name}: {problems}"


def test_the_scan_would_catch_them() -> None:
    """The AST check above is not vacuous, and does not flag what is harmless."""
    bad = "import pickle\nfrom marshal import loads\nx = pickle.loads(d)\neval('1')\n"
    bad += "exec(c)\nsubprocess.run(a, shell=True)\nimportlib.import_module(n)\n"
    assert len(code_problems(ast.parse(bad))) == 8
    good = "import re\nre.compile('x')\n# pickle is mentioned\n'eval(x) in a string'\n"
    good += "subprocess.run(a, shell=False)\n"
    assert code_problems(ast.parse(good)) == []


UMASK_CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    os.umask(0)
    import persizmq, persizmq.filter
    base = sys.argv[2]
    # Storages in directories that do not exist yet (with missing parents).
    with persizmq.PersistentStorage(base + "/a/b/queue", segment_size=64, sync="always") as s:
        for i in range(20):
            s.add_message(b"message %d" % i + b"." * 30)
        s.front()
        s.pop_front()
    # Damage a record in the middle of a segment so that the consumer quarantines it.
    seg = sorted(n for n in os.listdir(base + "/a/b/queue") if n.endswith(".log"))[1]
    path = base + "/a/b/queue/" + seg
    data = bytearray(open(path, "rb").read())
    data[64 + 16 + 2] ^= 0xFF  # a payload byte of the segment's first record
    open(path, "wb").write(bytes(data))
    os.chmod(path, 0o644)
    with persizmq.PersistentStorage(base + "/a/b/queue", segment_size=64) as s:
        while s.front() is not None:
            s.pop_front()
        report = {"corrupt": s.stats().corrupt_regions}
    with persizmq.PersistentLatestStorage(base + "/c/d/latest", sync="always") as latest:
        latest.add_message(b"one")
        latest.add_message(b"two")
    open(base + "/c/d/latest/latest.1.msg", "ab").write(b"damage")
    with persizmq.PersistentLatestStorage(base + "/c/d/latest") as latest:
        report["latest"] = latest.message().decode()
    flt = persizmq.filter.MinPeriod(0.0, base + "/e/f/period")
    flt(b"x")
    flt(b"y")
    print(json.dumps(report))
    """
)


def test_nothing_created_is_world_writable_even_under_umask_0(tmp_path: pathlib.Path) -> None:
    """Every entry persizmq creates -- missing parents of the directory, segments, position
    log, locks, quarantine files, latest slots and their .corrupt copies, the MinPeriod
    timestamp -- has no world-writable bit, even under umask 0 (parents used to get 0o777,
    quarantine files 0o666)."""
    base = tmp_path / "base"
    base.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", UMASK_CHILD, str(REPO), str(base)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"corrupt": 1, "latest": "one"}  # quarantine, .corrupt
    entries = list(base.rglob("*"))
    assert any(p.parent.name == "quarantine" for p in entries)
    assert any(p.name.endswith(".corrupt") for p in entries)
    assert len(entries) >= 15
    modes = {str(p.relative_to(base)): stat.S_IMODE(p.lstat().st_mode) for p in base.rglob("*")}
    bad = {name: oct(mode) for name, mode in modes.items() if mode & stat.S_IWOTH}
    assert not bad, f"world-writable under umask 0: {bad}"


# --------------------------------------------------------------------------- paths and content

HOSTILE: List[bytes] = [
    b"../../escaped",
    b"../escaped",
    b"/tmp/escaped-absolute",
    b"..",
    b".",
    b"quarantine/../../escaped",
    b"escaped\0hidden",
    b"latest.msg.tmp",
    b"00000000000000000099.log",
    b"consumer.offset",
    b"C:\\..\\escaped",
    b"%2e%2e%2fescaped",
    "../../\u00e9scaped".encode(),
]

DOCUMENTED = re.compile(
    r"^(\d{20}\.log|consumer\.offset|producer\.offset|producer\.lock|consumer\.lock|"
    r"quarantine|\d{20}\.log@\d+-\d+\.bin|latest\.lock|latest\.[01]\.msg|"
    r"latest\.[01]\.msg\.corrupt|last_timestamp\.txt|min_period\.lock|queue|latest|period)$"
)


def tree(path: pathlib.Path) -> Set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_message_content_never_becomes_a_path(tmp_path: pathlib.Path) -> None:
    outside_before = tree(tmp_path)
    root = tmp_path / "root"
    queue = root / "queue"
    with persizmq.PersistentStorage(queue, segment_size=64, sync="always") as storage:
        for msg in HOSTILE:
            storage.add_message(msg)
            storage.add_message([msg, msg])  # as topic frames too
        storage.add_messages(HOSTILE)
    # Damage a record in the middle: the quarantine file is named after the segment and the
    # offsets, never after the content.
    segment = sorted(p for p in queue.iterdir() if p.suffix == ".log")[2]
    data = bytearray(segment.read_bytes())
    data[64 + 16] ^= 0x01  # the first payload byte of the segment's first record
    segment.write_bytes(bytes(data))
    with persizmq.PersistentStorage(queue, segment_size=64) as storage:
        out = drain(storage)
        assert storage.stats().corrupt_regions == 1
    assert len(out) == 3 * len(HOSTILE) - 1
    with persizmq.PersistentLatestStorage(root / "latest") as latest:
        for msg in HOSTILE:
            latest.add_message(msg)
            assert latest.message() == msg
    period = persizmq.filter.MinPeriod(0.0, root / "period")
    for msg in HOSTILE:
        assert period(msg) == msg

    # Outside the root: nothing new. Inside: only documented names.
    assert (
        tree(tmp_path) - {str(pathlib.Path("root") / n) for n in tree(root)} - {"root"}
        == outside_before
    )
    names: Dict[str, str] = {}
    for entry in root.rglob("*"):
        names[entry.name] = str(entry.relative_to(root))
    unexpected = {n: where for n, where in names.items() if not DOCUMENTED.match(n)}
    assert not unexpected, unexpected
    assert not pathlib.Path("/tmp/escaped-absolute").exists()
    assert not (tmp_path.parent / "escaped").exists()


def test_min_period_timestamp_symlink_is_replaced_not_followed(tmp_path: pathlib.Path) -> None:
    """A ``last_timestamp.txt`` that is a symlink to another file: the filter replaces the link
    with its own file and never writes through it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    period_dir = tmp_path / "period"
    period_dir.mkdir()
    (period_dir / "last_timestamp.txt").symlink_to(victim)
    flt = persizmq.filter.MinPeriod(0.0, period_dir)
    assert flt(b"x") == b"x"
    assert victim.read_bytes() == b"precious\n"
    assert not (period_dir / "last_timestamp.txt").is_symlink()


def test_file_modes_are_documented_constants() -> None:
    from persizmq import _fs

    assert _fs.FILE_MODE & 0o022 == 0
    assert _fs.DIR_MODE & 0o022 == 0
    assert persizmq.__version__
