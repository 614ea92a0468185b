"""Progress of the command line's long runs on stderr, drawn with tqdm.

The library reports progress as calls ``progress(stage, done, total)``
(training adds ``info``: the epoch and running loss) and never prints;
:class:`ProgressBars` is such a callable. In a terminal each stage is a tqdm
bar (position, rate, time left; the epoch and loss as its postfix).
Elsewhere (batch logs, ``nohup``) a stage prints one whole line each time
another tenth of it is done, e.g.
``stage 1       120/480 (25 %) 00:12 elapsed, ~00:36 left``.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

#: ``wsiseg segment``'s stages.
SEGMENT_LABELS = {
    "stage1": "stage 1      ",
    "stage2": "tiles        ",
    "finish": "finishing    ",
    "baseline": "baseline     ",
}
#: ``wsiseg train``'s phases (and the scoring at its end).
TRAIN_LABELS = {"loading": "images  ", "stage1": "Model 1 ", "stage2": "Model 2 ", "baseline": "baseline",
                "scoring": "scoring "}
#: ``wsiseg evaluate`` and ``calibrate``: images scored.
IMAGE_LABELS = {"images": "images       "}

#: A terminal bar: the label as given (padded to line up the stages), then tqdm's bar and counts.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}{r_bar}"
#: A log line, with the time left while it is known (some items of this stage done, not all).
LINE_FORMAT = "{desc} {n_fmt}/{total_fmt} ({percentage:.0f} %) {elapsed} elapsed, ~{remaining} left{postfix}"
LAST_LINE_FORMAT = "{desc} {n_fmt}/{total_fmt} ({percentage:.0f} %) {elapsed} elapsed{postfix}"


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a closed or unusual stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogLines(tqdm):
    """A tqdm bar for a stream that is not a terminal: a whole line each time another tenth is done.

    The time left assumes the rest goes as fast as the items done since the
    bar started (``initial``: a resumed stage starts with some done).
    """

    monitor_interval = 0  # lines come from update() only: no refresh thread

    def __init__(self, total: int, initial: int, desc: str, file: TextIO, postfix: str = "") -> None:
        self.tenths = 0  # tenths of the total already printed (read by display(), which __init__ calls)
        super().__init__(total=total, initial=initial, desc=desc, file=file, postfix=postfix, mininterval=0,
                         miniters=1, smoothing=0, leave=False)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Print the bar's line when it reached another tenth; ``msg`` (clearing, on close) prints nothing."""
        if msg is not None or not self.total:
            return False
        tenths = 10 if self.n >= self.total else 10 * self.n // self.total
        if tenths > self.tenths:
            self.tenths = tenths
            known = self.initial < self.n < self.total
            self.fp.write(self.format_meter(**{**self.format_dict,
                                               "bar_format": LINE_FORMAT if known else LAST_LINE_FORMAT}) + "\n")
            self.fp.flush()
        return True


class ProgressBars:
    """Shows ``progress(stage, done, total[, info])`` calls on a stream, one stage at a time.

    A call with another stage than the last ends the last one's bar and
    starts a bar for the new stage (a :class:`tqdm.tqdm` in a terminal, a
    :class:`LogLines` elsewhere).

    Parameters
    ----------
    enabled : bool
        False shows nothing.
    labels : dict, optional
        Stage -> label (default :data:`SEGMENT_LABELS`); stages without one show their name.
    stream : text stream, optional
        Default: ``sys.stderr`` when this object is made.
    """

    def __init__(self, enabled: bool = True, labels: dict[str, str] | None = None,
                 stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.labels = labels or SEGMENT_LABELS
        self.stream = stream if stream is not None else sys.stderr
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        postfix = f"epoch {info['epoch']} loss {info['loss']:.4f}" if info else ""
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = self._bar(self.labels.get(stage, stage), done, total, postfix)
        elif postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _bar(self, label: str, done: int, total: int, postfix: str) -> tqdm:
        if is_terminal(self.stream):
            return tqdm(total=total, initial=done, desc=label, file=self.stream, postfix=postfix,
                        bar_format=BAR_FORMAT, dynamic_ncols=True)
        return LogLines(total=total, initial=done, desc=label, file=self.stream, postfix=postfix)

    def close(self) -> None:
        """End the current stage; the next call starts a new one, whatever its stage."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None
