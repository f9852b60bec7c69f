"""Stop signals (``persizmq._cli._signals``): a signal only requests a stop, handlers come back."""

import os
import signal
import threading
from typing import List

from persizmq._cli._signals import StopSignals


def test_a_signal_requests_a_stop_and_the_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.wait(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (the main) thread
        assert stop.wait(5.0)
        assert stop.requested
        assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen: List[object] = []

    def run() -> None:
        with StopSignals() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
            seen.append(stop.wait(0.01))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler, False]
