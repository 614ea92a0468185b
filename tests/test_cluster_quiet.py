"""A local cluster stays out of the user's way: no port 8787, and Ctrl-C ends with wsiseg's line only."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

from wsiseg.cluster import start_client


@contextlib.contextmanager
def _port_8787_taken():
    """Hold 127.0.0.1:8787 (where it is free) so that a cluster wanting it would have to warn."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
        yield


@pytest.mark.slow
@pytest.mark.cluster
def test_local_clusters_never_bind_8787_nor_warn_about_it(caplog) -> None:
    """Two local clusters at once, port 8787 taken: no warning; each HTTP server on a free loopback port."""
    clients = []
    with _port_8787_taken(), warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        try:
            clients = [start_client(workers=1), start_client(workers=1, processes=False)]
            servers = [client.cluster.scheduler.http_server for client in clients]
            ignored = clients[0].run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        finally:
            for client in clients:
                client.close()
    assert [str(w.message) for w in caught if "8787" in str(w.message)] == []
    assert [r.getMessage() for r in caplog.records if "8787" in r.getMessage()] == []
    assert all(server.address == "127.0.0.1" and server.port not in (0, 8787) for server in servers)
    # Local worker processes leave Ctrl-C to the command (see the next test).
    assert list(ignored.values()) == [True]


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_in_a_terminal_prints_wsiseg_line_only(tmp_path, pyramid_slide, test_bundle, interruptible) -> None:
    """Ctrl-C reaches the whole process group (the command and its local workers): one line, no traceback."""
    out = tmp_path / "run.zarr"
    command = [sys.executable, "-m", "wsiseg.cli", "segment", str(pyramid_slide), "--model", str(test_bundle),
               "--out", str(out), "--workers", "1", "--tile-size", "256", "--budget", "0.5", "--quiet"]
    with _port_8787_taken():
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        record = out / ".wsiseg" / "progress.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            if record.exists() and '"tiles"' in record.read_text():
                os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                break
            time.sleep(0.05)
        _, stderr = run.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr and "8787" not in stderr and len(lines) <= 3, stderr
    assert lines[-1] == "Interrupted; run the same command with --resume to continue."
    assert not (out / "report.json").exists()
