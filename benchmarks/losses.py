"""Time and peak memory of each training loss against plain cross-entropy.

    python benchmarks/losses.py [--batch 4] [--classes 19] [--size 512] [--repeats 3] [--threads 2]

Each loss runs forward and backward on a random ``batch x classes x size x
size`` batch, in its own process so that its peak memory is its own: the
figure is the growth of the process's peak resident memory over the inputs
already allocated. Prints a Markdown table (and the command) for
``benchmarks/RESULTS.md``; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import command_line, header, machine, make_parser, peak_rss_mb, set_torch_threads, write_json

LOSSES = ("ce", "focal", "ohem", "lad")


def measure_one(name: str, batch: int, classes: int, size: int, repeats: int, threads: int) -> dict[str, float]:
    """Best forward and backward seconds of one loss, and the growth of this process's peak memory (MB)."""
    import torch

    from wsiseg.train.losses import get_loss

    set_torch_threads(threads)
    torch.manual_seed(0)
    logits = torch.randn(batch, classes, size, size, requires_grad=True)
    target = torch.randint(0, classes, (batch, size, size))
    target[:, :8] = 255  # some ignored pixels
    loss_fn = get_loss(name)
    loss_fn(logits[:1, :, :32, :32], target[:1, :32, :32]).backward()  # warm-up
    logits.grad = None
    before = peak_rss_mb()
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = loss_fn(logits, target)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        logits.grad = None
        forward.append(middle - start)
        backward.append(end - middle)
    peak = peak_rss_mb()
    return {
        "loss": name,
        "forward_s": min(forward),
        "backward_s": min(backward),
        "peak_extra_mb": peak - before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one loss in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch, args.classes, args.size, args.repeats, args.threads)))
        return 0
    rows = []
    for name in LOSSES:
        command = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--classes", str(args.classes),
                   "--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    ce = rows[0]
    print("\n".join(header(command_line(__file__, argv), machine(),
                            f"{args.threads} torch threads, best of {args.repeats}; "
                            f"input {args.batch} x {args.classes} x {args.size} x {args.size} float32")))
    print("| loss | forward s | backward s | total vs CE | peak extra memory MB | vs CE |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        total = row["forward_s"] + row["backward_s"]
        ce_total = ce["forward_s"] + ce["backward_s"]
        print(f"| {row['loss']} | {row['forward_s']:.3f} | {row['backward_s']:.3f} | {total / ce_total:.2f}x "
              f"| {row['peak_extra_mb']:.0f} | {row['peak_extra_mb'] / max(ce['peak_extra_mb'], 1):.2f}x |")
    if args.json:
        write_json(Path(args.json), {"command": command_line(__file__, argv), "machine": machine(),
                                     "settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
