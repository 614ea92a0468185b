"""Progress on stderr: tqdm bars in a terminal, a line per tenth of a stage in logs."""

from __future__ import annotations

import io

import pytest
import tqdm.std

from wsiseg.progress import ProgressBars


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """tqdm's clock, read from ``clock[0]`` (seconds)."""
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_prints_a_line_per_tenth_with_time_left(clock) -> None:
    stream = io.StringIO()
    bars = ProgressBars(stream=stream)
    for done in range(481):
        clock[0] = 0.1 * done
        bars("stage1", done, 480)
    for done in range(4):
        clock[0] = 48.0 + 10 * done
        bars("finish", done, 3)
    bars.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 13
    assert lines[0] == "stage 1       48/480 (10 %) 00:04 elapsed, ~00:43 left"
    assert lines[4] == "stage 1       240/480 (50 %) 00:24 elapsed, ~00:24 left"
    assert lines[9] == "stage 1       480/480 (100 %) 00:48 elapsed"
    assert lines[10:] == [
        "finishing     1/3 (33 %) 00:10 elapsed, ~00:20 left",
        "finishing     2/3 (67 %) 00:20 elapsed, ~00:10 left",
        "finishing     3/3 (100 %) 00:30 elapsed",
    ]


def test_training_progress_without_a_terminal_shows_loss_and_time_left_from_a_resumed_step(clock) -> None:
    """A run resumed at step 600 of 1000 says so, and the time left comes from the steps done since."""
    stream = io.StringIO()
    bars = ProgressBars(labels={"stage1": "Model 1 "}, stream=stream)
    for done in range(600, 1001, 50):
        clock[0] = 0.5 * (done - 600)
        bars("stage1", done, 1000, {"epoch": 1 + done // 100, "loss": 1000 / (done + 1)})
    bars.close()
    assert stream.getvalue().splitlines() == [
        "Model 1  600/1000 (60 %) 00:00 elapsed, epoch 7 loss 1.6639",
        "Model 1  700/1000 (70 %) 00:50 elapsed, ~02:30 left, epoch 8 loss 1.4265",
        "Model 1  800/1000 (80 %) 01:40 elapsed, ~01:40 left, epoch 9 loss 1.2484",
        "Model 1  900/1000 (90 %) 02:30 elapsed, ~00:50 left, epoch 10 loss 1.1099",
        "Model 1  1000/1000 (100 %) 03:20 elapsed, epoch 11 loss 0.9990",
    ]


def test_progress_in_a_terminal_is_a_tqdm_bar_per_stage_with_time_left_and_loss(clock) -> None:
    stream = Terminal()
    bars = ProgressBars(stream=stream, labels={"stage1": "Model 1 ", "stage2": "Model 2 "})
    bars("stage2", 1, 10)
    assert type(bars.bar) is tqdm.std.tqdm and (bars.bar.n, bars.bar.total) == (1, 10)
    bars.close()
    bars("stage2", 1, 10)  # after close() the same stage starts a new bar
    assert bars.bar.n == 1
    clock[0] = 2.0
    bars("stage2", 3, 10)
    bars("stage1", 5, 10, {"epoch": 2, "loss": 0.5})  # another stage: the last bar ends on its line
    bars.close()
    text = stream.getvalue()
    assert "Model 2   30%|" in text and "3/10 [00:02<00:07," in text  # 2 items in 2 s since it began at 1
    assert text.rstrip().endswith("5/10 [00:00<?, ?it/s, epoch 2 loss 0.5000]")


def test_quiet_shows_nothing() -> None:
    stream = Terminal()
    bars = ProgressBars(enabled=False, stream=stream)
    bars("stage1", 1, 2)
    bars.close()
    assert stream.getvalue() == ""
