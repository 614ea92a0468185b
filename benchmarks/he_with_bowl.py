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

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

THRESHOLDS = (1.0, 0.6, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="NuInsSeg (folder layout)")
    parser.add_argument("--bowl-root", type=Path, required=True, help="BOWL's stage1_train folder")
    parser.add_argument("--init-from", type=Path, required=True, help="the bundle both candidates fine-tune")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per model")
    parser.add_argument("--work", type=Path, required=True, help="where the candidates' bundles go")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    import torch

    import train_default_model as pipeline
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate, format_table
    from wsiseg.train.datasets import open_dataset
    from wsiseg.train.fit import train

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = open_dataset("nuinsseg", args.data_root)
    command = "python benchmarks/he_with_bowl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"command": command, "epochs": args.epochs, "candidates": {}}
    lines = [f"`{command}`  ", f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}", ""]
    for variant in ("he", "he-bowl"):
        config = pipeline.training_config(args.data_root, variant, args.init_from, bowl_root=args.bowl_root)
        config = replace(config, epochs=args.epochs, stage="two-stage")
        started = time.perf_counter()
        bundle = load_bundle(train(config, args.work / f"{variant}.safetensors"))
        trained_s = time.perf_counter() - started
        bundle.config.update(pipeline.INFERENCE)
        test = data.split("test", int(bundle.config["training"]["split_seed"]))
        rows = evaluate(bundle, data, test, THRESHOLDS, device="cpu")
        seconds = bundle.config["training"].get("seconds", {})
        report["candidates"][variant] = {"rows": [asdict(r) for r in rows], "train_seconds": seconds,
                                         "wall_seconds": round(trained_s)}
        lines += [f"**{variant}** (train {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})", "", "```",
                  *format_table(rows), "```", ""]
        print("\n".join(lines[-len(rows) - 5:]), file=sys.stderr)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "he_with_bowl.json").write_text(json.dumps(report, indent=2))
    (args.results / "he_with_bowl.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
