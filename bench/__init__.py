"""Benchmarks of persizmq 3 against persizmq 1.0.3 and peer disk queues (SPEC section 7).

Run everything from the repository root with ``python3 bench/run_all.py [--quick]``; each part
also runs alone (``python3 bench/storage.py``, ``bench/end_to_end.py``, ``bench/scale.py``).
The peers are installed on demand into a private virtualenv, ``bench/.venv-anchors/`` (see
:mod:`bench._anchors`), because persizmq 1.0.3 and persizmq 3 share their import name.
"""
