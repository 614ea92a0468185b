"""Does BOWL help an H&E model? The ``he`` and ``he-bowl`` rounds, trained alike for a few epochs, scored on NuInsSeg val.

    python benchmarks/he_with_bowl.py --data-root ../shared/data/nuinsseg --bowl-root ../shared/data/bowl
        --init-from wsiseg/data/bowl.safetensors --epochs 6 --work DIR [--results benchmarks/results]

Both candidates fine-tune the same bundle with the settings of
``pipelines/train_default_model.py``'s variants (``he``: NuInsSeg's train
split; ``he-bowl``: BOWL's train split added) except the number of epochs
and the phases: Model 1 and Model 2 only (``--stage two-stage``), the part
that decides the default path. Each is scored on NuInsSeg's val split at
thresholds 1 (Model 1 alone), 0.6 and 0 (Model 2 everywhere). Writes
``he_with_bowl.{json,md}`` with the training seconds of each model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

from common import (ROOT, Stopwatch, add_data_arguments, add_results_argument, command_line, header, machine,
                    make_parser, set_torch_threads, write_result)

sys.path.insert(0, str(ROOT / "pipelines"))

THRESHOLDS = (1.0, 0.6, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    add_data_arguments(parser, limit=False, help="NuInsSeg (folder layout)")
    parser.add_argument("--bowl-root", type=Path, required=True, help="BOWL's stage1_train folder")
    parser.add_argument("--init-from", type=Path, required=True, help="the bundle both candidates fine-tune")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per model")
    parser.add_argument("--work", type=Path, required=True, help="where the candidates' bundles go")
    add_results_argument(parser)
    args = parser.parse_args(argv)

    import train_default_model as pipeline
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate, format_table
    from wsiseg.train.datasets import open_dataset
    from wsiseg.train.fit import train

    set_torch_threads()
    data = open_dataset("nuinsseg", args.data_root)
    report: dict = {"command": command_line(__file__, argv), "machine": machine(), "epochs": args.epochs,
                    "candidates": {}}
    lines = header(report["command"], report["machine"])
    for variant in ("he", "he-bowl"):
        config = pipeline.training_config(args.data_root, variant, args.init_from, bowl_root=args.bowl_root)
        config = replace(config, epochs=args.epochs, stage="two-stage")
        with Stopwatch() as watch:
            bundle = load_bundle(train(config, args.work / f"{variant}.safetensors"))
        bundle.config.update(pipeline.INFERENCE)
        test = data.split("test", int(bundle.config["training"]["split_seed"]))
        rows = evaluate(bundle, data, test, THRESHOLDS, device="cpu")
        seconds = bundle.config["training"].get("seconds", {})
        report["candidates"][variant] = {"rows": [asdict(r) for r in rows], "train_seconds": seconds,
                                         "wall_seconds": round(watch.seconds)}
        lines += [f"**{variant}** (train {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})", "", "```",
                  *format_table(rows), "```", ""]
        print("\n".join(lines[-len(rows) - 5:]), file=sys.stderr)
    write_result(args.results, "he_with_bowl", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
