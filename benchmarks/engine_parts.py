"""Three parts of the engine timed alone: block means, area resampling by a non-integer factor, and forward passes with
batch norms folded.

    python benchmarks/engine_parts.py [--model BUNDLE] [--repeats 5] [--results DIR]

0. **Block means** by 2, 3 and 4 (:func:`wsiseg.tiling.downsample_mean`; 3 is
   how stage 1 reads a 20x slide's level 0 for Model 1 at 1/3) of a
   1728 x 1728 region: strided slices added into uint16 (now) against one
   reduction over two axes of a 5-D view in uint32 (before, kept here as the
   reference), and whether the two agree.
1. **Area resampling** (:func:`wsiseg.resample.read_scaled` by 1.5 and 1.6,
   the reads of a 20x level at 1/3 and of a 40x slide for a 0.4 um model):
   milliseconds per 512 x 512 output, wsiseg's banded weights (a few input
   pixels per output pixel) against the dense weight matrices it used before
   (kept here as the reference), and how many output values the two differ in.
2. **Forward passes** of the bundle's Model 1 and Model 2 on one 576 x 576
   window (a 512-pixel tile and its 32-pixel halo), channels-last on the CPU
   as :class:`wsiseg.inference.ModelRunner` runs them: the model as trained
   against its copy with batch norms folded into the convolutions
   (:func:`wsiseg.models.base.fold_batch_norms`), and the largest difference
   in their logits.

Results: ``engine_parts.json`` and ``.md`` in ``--results``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, command_line, header, machine, make_parser, set_torch_threads, write_result


def dense_area(image: Any, factor: float, height: int, width: int) -> Any:
    """The reference: ``image`` area-downsampled by ``factor`` to ``(height, width)`` with dense weight matrices."""
    import numpy as np

    def weights(count: int, size: int) -> Any:
        low = np.arange(count, dtype=np.float64) * factor
        high = np.minimum(low + factor, size)
        edges = np.arange(size + 1, dtype=np.float64)
        overlap = np.clip(np.minimum(high[:, None], edges[None, 1:]) - np.maximum(low[:, None], edges[None, :-1]), 0, None)
        return overlap / overlap.sum(axis=1, keepdims=True)

    rows = np.einsum("ij,jwc->iwc", weights(height, image.shape[0]), image.astype(np.float64))
    return np.rint(np.einsum("iwc,kw->ikc", rows, weights(width, image.shape[1]))).clip(0, 255).astype(np.uint8)


def reduced_block_means(image: Any, ratio: int) -> Any:
    """The reference: rounded block means of whole blocks by one ``sum(axis=(1, 3))`` of a 5-D view."""
    import numpy as np

    h, w, c = (image.shape[0] // ratio, image.shape[1] // ratio, image.shape[2])
    sums = image[: h * ratio, : w * ratio].reshape(h, ratio, w, ratio, c).sum(axis=(1, 3), dtype=np.uint32)
    quotient, remainder = np.divmod(sums, ratio * ratio)
    up = (2 * remainder > ratio * ratio) | ((2 * remainder == ratio * ratio) & (quotient % 2 == 1))
    return (quotient + up).astype(np.uint8)


def best_of(repeats: int, call: Any) -> float:
    """The fastest of ``repeats`` calls, in milliseconds (after one warm-up call)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default="wsiseg:default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from wsiseg.bundle import load_bundle, resolve_model
    from wsiseg.models.base import fold_batch_norms
    from wsiseg.resample import read_scaled
    from wsiseg.run.in_memory import ImageSource
    from wsiseg.tiling import Box, downsample_mean

    threads = set_torch_threads(1)
    region = np.random.default_rng(1).integers(0, 256, (1728, 1728, 3)).astype(np.uint8)
    block_means = []
    for ratio in (2, 3, 4):
        block_means.append({"ratio": ratio, "slices_ms": best_of(args.repeats, lambda r=ratio: downsample_mean(region, r)),
                            "reduction_ms": best_of(args.repeats, lambda r=ratio: reduced_block_means(region, r)),
                            "equal": bool((downsample_mean(region, ratio) == reduced_block_means(region, ratio)).all())})
    image = np.random.default_rng(0).integers(0, 256, (830, 830, 3)).astype(np.uint8)
    source = ImageSource(image)
    resampling = []
    for factor in (1.5, 1.6):
        span = int(np.ceil(512 * factor)) + 1
        banded = best_of(args.repeats, lambda f=factor: read_scaled(source, 0, f, Box(0, 512, 0, 512)))
        dense = best_of(args.repeats, lambda f=factor, s=span: dense_area(image[:s, :s], f, 512, 512))
        ours, reference = read_scaled(source, 0, factor, Box(0, 512, 0, 512)), dense_area(image[:span, :span], factor, 512, 512)
        difference = np.abs(ours.astype(int) - reference)
        resampling.append({"factor": factor, "banded_ms": banded, "dense_ms": dense,
                           "values_differing": float((difference > 0).mean()), "largest_difference": int(difference.max())})
    bundle = load_bundle(resolve_model(args.model))
    window = torch.rand(1, 3, 576, 576).contiguous(memory_format=torch.channels_last)
    forwards = []
    for role in ("model1", "model2"):
        model = bundle.models[role]
        trained = model.eval().to(memory_format=torch.channels_last)
        folded = fold_batch_norms(model).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            plain_ms = best_of(args.repeats, lambda: trained(window))
            folded_ms = best_of(args.repeats, lambda: folded(window))
            gap = float((trained(window)[0] - folded(window)[0]).abs().max())
        forwards.append({"role": role, "trained_ms": plain_ms, "folded_ms": folded_ms, "largest_logit_difference": gap})
    record = {"command": command_line(__file__, argv), "machine": machine(), "threads": threads,
              "block_means": block_means, "resampling": resampling, "forwards": forwards}
    lines = header(record["command"], record["machine"]) + [
        "Block means of a 1728 x 1728 region (1 thread, fastest of the repeats):", "",
        "| factor | one reduction of a 5-D view (before) ms | strided slices (now) ms | speed-up | equal |",
        "|---|---|---|---|---|",
        *(f"| {b['ratio']} | {b['reduction_ms']:.1f} | {b['slices_ms']:.1f} | {b['reduction_ms'] / b['slices_ms']:.0f}x | "
          f"{'yes' if b['equal'] else 'no'} |" for b in block_means),
        "", "Area resampling, one 512 x 512 output (1 thread, fastest of the repeats):", "",
        "| factor | dense weights (before) ms | banded (now) ms | speed-up | output values differing | largest difference |",
        "|---|---|---|---|---|---|",
        *(f"| {r['factor']:g} | {r['dense_ms']:.1f} | {r['banded_ms']:.1f} | {r['dense_ms'] / r['banded_ms']:.0f}x | "
          f"{r['values_differing']:.2%} | {r['largest_difference']} |" for r in resampling),
        "", f"Forward passes of `{args.model}` on one 576 x 576 window (1 thread, channels-last):", "",
        "| model | as trained ms | batch norms folded ms | saved | largest logit difference |", "|---|---|---|---|---|",
        *(f"| {f['role']} | {f['trained_ms']:.0f} | {f['folded_ms']:.0f} | {1 - f['folded_ms'] / f['trained_ms']:.0%} | "
          f"{f['largest_logit_difference']:.1e} |" for f in forwards),
    ]
    write_result(args.results, "engine_parts", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
