"""Speed, work, memory and scaling of two-stage vs full-resolution segmentation.

    python benchmarks/bench_segment.py speed   SLIDE [--thresholds 0 0.25 0.5 0.75 1] [--workers 2]
    python benchmarks/bench_segment.py memory  SLIDE [SLIDE ...]
    python benchmarks/bench_segment.py scaling SLIDE
    python benchmarks/bench_segment.py peer    SLIDE [--region 4096]
    [--model BUNDLE] [--out benchmarks/results] [--keep]

Every run is a real ``wsiseg segment`` process with its own local Dask
cluster, as a user runs it; its whole process tree (driver, scheduler and
worker processes) is sampled every 0.2 s for the peak resident memory.

``speed``   the full-resolution baseline, then the two-stage pipeline at each
            threshold: wall time, model GFLOP actually executed (counted by
            torch's FLOP counter per input shape), refined-tile fraction, and
            agreement (Dice of the two-stage mask against the full-resolution
            mask, and against the two-stage mask at threshold 0, which is
            Model 2 everywhere). Then where the time of the default run goes,
            and the convolutions' throughput against this machine's measured
            fp32 matmul peak.
``memory``  peak RSS of the process tree, two-stage at the default threshold,
            for each slide.
``scaling`` the default two-stage run with 1 and with 2 workers.
``peer``    MONAI's ``sliding_window_inference`` (the optional ``bench``
            extra) with the bundle's full-resolution model over a region of the
            slide, against wsiseg's full-resolution and two-stage runs on the
            same region.

Each study prints Markdown (with the command) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- running


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def run_segment(slide: Path, out: Path, args: list[str], workers: int, model: str | None) -> dict[str, Any]:
    """``wsiseg segment`` in a subprocess; its report plus wall seconds and peak tree RSS."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "wsiseg.cli", "segment", str(slide), "--out", str(out), "--quiet",
               "--workers", str(workers), *args]
    if model:
        command += ["--model", model]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.strip()}")
    report = json.loads((out / "report.json").read_text())
    report["bench"] = {"process_seconds": time.perf_counter() - start, "peak_tree_rss_mb": peak[0] / 2**20,
                       "command": " ".join(command[2:])}
    return report


def mask_dice(a: Path, b: Path) -> float:
    """Foreground Dice between two outputs' ``mask/0``, chunk by chunk (flat memory)."""
    import zarr

    first, second = zarr.open_array(str(a / "mask/0"), mode="r"), zarr.open_array(str(b / "mask/0"), mode="r")
    if first.shape != second.shape:
        raise ValueError("masks differ in shape")
    step = first.chunks[0] * 4
    both = either = 0
    for y in range(0, first.shape[0], step):
        x1, x2 = first[y : y + step] > 0, second[y : y + step] > 0
        both += int((x1 & x2).sum())
        either += int(x1.sum()) + int(x2.sum())
    return 1.0 if either == 0 else 2 * both / either


def machine() -> str:
    import torch

    cores = len(os.sched_getaffinity(0))
    return (f"{platform.machine()}, {cores} cores, torch {torch.__version__}, python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) with ``threads`` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def _total_gflop(report: dict[str, Any]) -> float:
    return float(sum(report.get("model_gflop", {}).values()))


# --------------------------------------------------------------------------- studies


def study_speed(slide: Path, thresholds: list[float], workers: int, model: str | None, scratch: Path) -> dict[str, Any]:
    full_out = scratch / "full.zarr"
    full = run_segment(slide, full_out, ["--full-resolution"], workers, model)
    rows = [{"run": "full resolution", "threshold": None, "refined": 1.0, "seconds": full["timings"]["total"],
             "gflop": _total_gflop(full), "dice_vs_full": 1.0, "dice_vs_t0": None}]
    outputs = {}
    for threshold in sorted(thresholds):
        out = scratch / f"t{threshold:g}.zarr"
        report = run_segment(slide, out, ["--threshold", f"{threshold:g}"], workers, model)
        outputs[threshold] = (out, report)
    t0_out = outputs[min(thresholds)][0] if min(thresholds) == 0 else None
    for threshold, (out, report) in outputs.items():
        rows.append({
            "run": "two-stage", "threshold": threshold, "refined": report["tiles"]["refined_fraction"],
            "seconds": report["timings"]["total"], "gflop": _total_gflop(report),
            "dice_vs_full": mask_dice(out, full_out),
            "dice_vs_t0": mask_dice(out, t0_out) if t0_out else None,
        })
    default_threshold = bundle_threshold(model)
    if default_threshold not in outputs:
        outputs_default = run_segment(slide, scratch / "default.zarr", [], workers, model)
    else:
        outputs_default = outputs[default_threshold][1]
    default = outputs_default
    return {"slide": str(slide), "workers": workers, "default_threshold": default_threshold, "rows": rows, "full_report": _brief(full),
            "default_report": _brief(default), "breakdown": breakdown(default, workers), "baseline_breakdown": breakdown(full, workers)}


def bundle_threshold(model: str | None) -> float:
    """The threshold ``wsiseg segment`` uses when given none: the bundle's."""
    from wsiseg.bundle import inspect_bundle, resolve_model
    from wsiseg.segment import default_selection

    return default_selection(inspect_bundle(resolve_model(model))["config"]).value


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("timings", "task_seconds", "model_gflop", "tiles", "settings", "stage1", "working_resolution", "bench")
    return {k: report.get(k) for k in keys}


def breakdown(report: dict[str, Any], threads: int) -> dict[str, Any]:
    """Where the time of a run goes, in worker-thread seconds (wall x threads)."""
    wall = report["timings"]["total"]
    available = wall * threads
    tasks = report["task_seconds"]
    model = tasks.get("model", 0.0) + tasks.get("context", 0.0)
    parts = {
        "model forward (stage 1, stage 2, context)": model,
        "read / decode": tasks.get("read", 0.0),
        "compose + write": tasks.get("compose", 0.0) + tasks.get("write", 0.0),
    }
    parts["scheduling, driver and idle"] = max(0.0, available - sum(parts.values()))
    gflop = _total_gflop(report)
    return {
        "wall_s": wall, "thread_seconds": available,
        "parts_s": parts,
        "parts_fraction": {k: v / available for k, v in parts.items()},
        "stages_wall_s": {k: v for k, v in report["timings"].items() if k != "total"},
        "model_gflop": gflop,
        "conv_gflops": gflop / model if model else 0.0,
    }


def study_memory(slides: list[Path], workers: int, model: str | None, scratch: Path) -> dict[str, Any]:
    rows = []
    for slide in slides:
        report = run_segment(slide, scratch / f"{slide.stem}.zarr", [], workers, model)
        rows.append({"slide": slide.name, "size": report["input"]["size"], "seconds": report["timings"]["total"],
                     "refined": report["tiles"]["refined_fraction"], "peak_tree_rss_mb": report["bench"]["peak_tree_rss_mb"]})
        shutil.rmtree(scratch / f"{slide.stem}.zarr")
    return {"rows": rows}


def study_scaling(slide: Path, model: str | None, scratch: Path) -> dict[str, Any]:
    rows = []
    for workers in (1, 2):
        report = run_segment(slide, scratch / f"w{workers}.zarr", [], workers, model)
        rows.append({"workers": workers, "seconds": report["timings"]["total"],
                     "stage_seconds": {k: v for k, v in report["timings"].items() if k != "total"}})
    return {"slide": str(slide), "rows": rows, "speedup": rows[0]["seconds"] / rows[1]["seconds"]}


def study_peer(slide: Path, region: int, workers: int, model: str | None, scratch: Path) -> dict[str, Any]:
    """MONAI sliding-window inference vs wsiseg on the same region, same model."""
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    from wsiseg.bundle import load_bundle, resolve_model
    from wsiseg.slide import Box, open_slide

    source = open_slide(slide)
    h, w = source.shape
    size = min(region, h, w)
    y0, x0 = (h - size) // 2, (w - size) // 2
    pixels = source.read_region(0, Box(y0, y0 + size, x0, x0 + size))
    region_path = scratch / "region.tif"
    tile = source.levels[0].tile_shape[0] if source.levels[0].tile_shape else 512
    tifffile.imwrite(region_path, pixels, tile=(tile, tile), photometric="rgb", compression="zlib",
                     resolution=(1e4 / source.mpp[1], 1e4 / source.mpp[0]) if source.mpp else None,
                     resolutionunit="CENTIMETER" if source.mpp else None)
    full = run_segment(region_path, scratch / "region-full.zarr", ["--full-resolution"], workers, model)
    two = run_segment(region_path, scratch / "region-two.zarr", [], workers, model)

    bundle = load_bundle(resolve_model(model))
    net = bundle.model.eval()
    halo, tile_size = full["settings"]["halo"], full["settings"]["tile_size"]
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, roi_size=(tile_size + 2 * halo, tile_size + 2 * halo), sw_batch_size=4,
            predictor=lambda batch: net(batch)[0], overlap=2 * halo / (tile_size + 2 * halo), mode="constant",
        )
    monai_seconds = time.perf_counter() - start
    monai_mask = (torch.sigmoid(logits[0, 0]) >= 0.5).numpy() if logits.shape[1] == 1 else logits[0].argmax(0).numpy() > 0
    import zarr

    wsiseg_mask = zarr.open_array(str(scratch / "region-full.zarr" / "mask/0"), mode="r")[...] > 0
    both = int((monai_mask & wsiseg_mask).sum())
    agreement = 2 * both / max(1, int(monai_mask.sum()) + int(wsiseg_mask.sum()))
    return {
        "region": size, "slide": str(slide),
        "rows": [
            {"run": "MONAI sliding_window_inference (in memory, 1 process)", "seconds": monai_seconds},
            {"run": "wsiseg --full-resolution", "seconds": full["timings"]["total"], "process_seconds": full["bench"]["process_seconds"]},
            {"run": f"wsiseg two-stage (default threshold {bundle_threshold(model):g})", "seconds": two["timings"]["total"], "process_seconds": two["bench"]["process_seconds"],
             "refined": two["tiles"]["refined_fraction"]},
        ],
        "dice_monai_vs_wsiseg_full": agreement,
    }


# --------------------------------------------------------------------------- printing


def print_markdown(study: str, result: dict[str, Any], command: str) -> None:
    print(f"\n`{command}`  \n{machine()}\n")
    if study == "speed":
        full = result["rows"][0]
        print("| run | threshold | refined tiles | wall s | speed-up | model GFLOP | FLOP ratio | Dice vs full-res | Dice vs t=0 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in result["rows"]:
            t = "" if row["threshold"] is None else f"{row['threshold']:g}"
            vs_t0 = "" if row["dice_vs_t0"] is None else f"{row['dice_vs_t0']:.4f}"
            print(f"| {row['run']} | {t} | {100 * row['refined']:.1f} % | {row['seconds']:.1f} | "
                  f"{full['seconds'] / row['seconds']:.2f}x | {row['gflop']:.0f} | {full['gflop'] / max(row['gflop'], 1e-9):.2f}x | "
                  f"{row['dice_vs_full']:.4f} | {vs_t0} |")
        for name in ("breakdown", "baseline_breakdown"):
            b = result[name]
            print(f"\n{'Default two-stage run (threshold ' + format(result['default_threshold'], 'g') + ')' if name == 'breakdown' else 'Full-resolution run'}: {b['wall_s']:.1f} s wall x "
                  f"{result['workers']} worker threads = {b['thread_seconds']:.1f} thread-seconds")
            print("\n| where | thread-seconds | share |\n|---|---|---|")
            for part, seconds in b["parts_s"].items():
                print(f"| {part} | {seconds:.1f} | {100 * b['parts_fraction'][part]:.1f} % |")
            print(f"\nconvolutions: {b['model_gflop']:.0f} GFLOP in {b['parts_s']['model forward (stage 1, stage 2, context)']:.1f} "
                  f"thread-seconds = {b['conv_gflops']:.1f} GFLOP/s per thread; stage walls: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in b["stages_wall_s"].items()))
        print(f"\nfp32 matmul peak (torch, 2048^2): {result['matmul_1thread']:.1f} GFLOP/s with 1 thread, "
              f"{result['matmul_all']:.1f} GFLOP/s with all cores")
    elif study == "memory":
        print("| slide | size | refined | wall s | peak RSS of the process tree MB |\n|---|---|---|---|---|")
        for row in result["rows"]:
            print(f"| {row['slide']} | {row['size'][0]} x {row['size'][1]} | {100 * row['refined']:.1f} % | "
                  f"{row['seconds']:.1f} | {row['peak_tree_rss_mb']:.0f} |")
    elif study == "scaling":
        print("| workers | wall s | stages |\n|---|---|---|")
        for row in result["rows"]:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stage_seconds"].items())
            print(f"| {row['workers']} | {row['seconds']:.1f} | {stages} |")
        print(f"\nspeed-up with 2 workers: {result['speedup']:.2f}x")
    elif study == "peer":
        print(f"region {result['region']} x {result['region']} pixels\n\n| run | seconds |\n|---|---|")
        for row in result["rows"]:
            print(f"| {row['run']} | {row['seconds']:.1f} |")
        print(f"\nDice of MONAI's mask vs wsiseg's full-resolution mask: {result['dice_monai_vs_wsiseg_full']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["speed", "memory", "scaling", "peer"])
    parser.add_argument("slides", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--region", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the runs' outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_segment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="wsiseg-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.study == "speed":
            result = study_speed(args.slides[0], args.thresholds, args.workers, args.model, scratch)
            result["matmul_1thread"] = matmul_peak_gflops(1)
            result["matmul_all"] = matmul_peak_gflops(len(os.sched_getaffinity(0)))
        elif args.study == "memory":
            result = study_memory(args.slides, args.workers, args.model, scratch)
        elif args.study == "scaling":
            result = study_scaling(args.slides[0], args.model, scratch)
        else:
            result = study_peer(args.slides[0], args.region, args.workers, args.model, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result["machine"] = machine()
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.study}-{args.slides[0].stem}.json").write_text(json.dumps(result, indent=2, default=float))
    print_markdown(args.study, result, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
