"""Preload of the local cluster's worker processes (:func:`wsiseg.cluster.start_client`).

Ctrl-C in a terminal interrupts every process of the terminal's process
group: the command and the worker processes its local cluster spawned. The
command stops the run and closes the cluster; a worker interrupted on its own
would only print a ``KeyboardInterrupt`` traceback. Local workers therefore
ignore SIGINT from the moment Dask runs this preload.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def ignore_interrupts() -> bool:
    """Ignore SIGINT in this process; return False where that is not possible (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return True


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in each local worker process as it starts."""
    ignore_interrupts()
