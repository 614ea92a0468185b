"""(Benchmark only.) A whole slide through TIAToolbox 2.x's ``SemanticSegmentor`` with a wsiseg
bundle's full-resolution network (its baseline, else Model 2 without context); run by ``bench_segment.py wsi-peer --peers tiatoolbox`` with the
Python of a separate virtual environment that holds TIAToolbox, never wsiseg's own.

    python benchmarks/peers/tiatoolbox_wsi.py SLIDE MODEL OUT_DIR --tile 512 --halo 32

TIAToolbox pins ``torch<2.13``; the environment this was measured in (benchmarks/RESULTS.md) was
made with pip upgraded first, ``pip install torch==2.14.1 torchvision==0.29.1``, ``pip install
--no-deps tiatoolbox==2.1.3``, then TIAToolbox's other requirements and ``safetensors``. wsiseg is
imported from this checkout (not installed there).

Patches of ``tile + 2 * halo`` pixels read at the slide's base resolution with a stride of
``tile``, TIAToolbox's own tissue mask (``auto_get_mask``), batch 4; the network's probabilities
are merged by TIAToolbox and saved as a Zarr ``predictions`` array (argmax, as TIAToolbox's own
segmentation models do). Prints one JSON line: seconds, patches, peak RSS and the Zarr's path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# wsiseg from this checkout (not installed in the peer's environment), and the benchmarks' helpers.
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from common import Stopwatch, full_resolution_network, make_parser, peak_rss_mb, set_torch_threads  # noqa: E402


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("slide", type=Path)
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tile", type=int, required=True)
    parser.add_argument("--halo", type=int, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    set_torch_threads()
    network = full_resolution_network(args.model)
    patches = [0]

    class BundleNetwork(ModelABC):
        """The bundle's full-resolution network as a TIAToolbox model: ``(N, H, W, 3)`` uint8 in,
        ``(N, H, W, C)`` class probabilities out (a binary model's one logit becomes two classes)."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x)[0]

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:
            return image.argmax(axis=-1).astype(np.uint8)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: np.ndarray | torch.Tensor, *, device: str) -> np.ndarray:
            x = torch.as_tensor(batch_data).permute(0, 3, 1, 2).float() / 255.0
            patches[0] += x.shape[0]
            with torch.inference_mode():
                logits = model(x)
            if logits.shape[1] == 1:
                foreground = torch.sigmoid(logits)
                probabilities = torch.cat([1 - foreground, foreground], 1)
            else:
                probabilities = torch.softmax(logits, 1)
            return probabilities.permute(0, 2, 3, 1).numpy()

    window = args.tile + 2 * args.halo
    base = {"units": "baseline", "resolution": 1.0}
    ioconfig = IOSegmentorConfig(input_resolutions=[base], output_resolutions=[base], save_resolution=base,
                                 patch_input_shape=(window, window), patch_output_shape=(window, window),
                                 stride_shape=(args.tile, args.tile))
    segmentor = SemanticSegmentor(model=BundleNetwork(), batch_size=4, num_workers=0, device="cpu", verbose=False)
    with Stopwatch() as watch:
        saved = segmentor.run([args.slide], patch_mode=False, ioconfig=ioconfig, save_dir=args.out,
                              output_type="zarr", auto_get_mask=True, overwrite=True)
    print(json.dumps({"seconds": watch.seconds, "patches": patches[0], "zarr": str(next(iter(saved.values()))),
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
