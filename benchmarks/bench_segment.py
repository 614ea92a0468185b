"""Speed, work, memory and scaling of two-stage vs full-resolution segmentation.

    python benchmarks/bench_segment.py speed   SLIDE [--thresholds 0 0.25 0.5 0.75 1] [--workers 2] [--ratio N]
    python benchmarks/bench_segment.py memory  SLIDE [SLIDE ...]
    python benchmarks/bench_segment.py scaling SLIDE
    python benchmarks/bench_segment.py peer    SLIDE [--region 4096]
    python benchmarks/bench_segment.py wsi-peer SLIDE [--peers monai,tiatoolbox --tiatoolbox-python PY]
    [--model BUNDLE] [--out benchmarks/results] [--scratch DIR]

Every run is a real ``wsiseg segment`` process with its own local Dask
cluster, as a user runs it. Its whole process tree (driver and scheduler,
nannies, workers) is sampled every 0.5 s: the peak of the summed resident
memory (RSS, which counts shared library pages once per process) and of the
summed proportional memory (PSS, which splits them among the processes).

``speed``   the full-resolution baseline, then the two-stage pipeline at each
            threshold: wall time, model GFLOP executed (counted per input
            shape), refined-tile fraction, and agreement: Dice of the mask
            against the full-resolution baseline's mask, and against the
            two-stage mask at threshold 0 (Model 2 on every tile, the output
            the two-stage pipeline approximates). Then where the time of the
            default run and of the baseline goes, stage by stage, and the
            convolutions' throughput against this machine's fp32 matmul peak.
``memory``  the two-stage run at the default threshold for each slide.
``scaling`` the default two-stage run with 1 worker on 1 core and with 2
            workers on 2 cores (the process tree pinned with CPU affinity, so
            that the 1-worker run cannot use the second core through torch's
            threads), and 1 worker with 2 torch threads for reference.
``wsi-peer`` the whole slide through peers (``--peers monai,tiatoolbox``) with
            the bundle's full-resolution network, against wsiseg's
            full-resolution and two-stage runs (their tissue mask on): MONAI's
            patch inferer (patches read with OpenSlide, merged into Zarr;
            every patch, MONAI has no tissue mask), and TIAToolbox 2.x's
            SemanticSegmentor with its tissue mask, in a separate environment
            (``--tiatoolbox-python``, see ``benchmarks/peers/tiatoolbox_wsi.py``).
``peer``    MONAI's ``sliding_window_inference`` (the optional ``bench``
            extra) with the bundle's full-resolution model over a region of
            the slide held in memory, against wsiseg's full-resolution and
            two-stage runs on the same region.

Each study writes JSON and Markdown (with the command on top) to ``--out``
and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (ROOT, Stopwatch, add_results_argument, command_line, cores, full_resolution_network, header,
                    machine, make_parser, peak_rss_mb, set_torch_threads, write_result)


# --------------------------------------------------------------------------- running


def _tree_memory(pid: int) -> tuple[int, int]:
    """Summed RSS and PSS (bytes) of a process and all its descendants."""
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for member in members:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += info.pss
    return rss, pss


def run_segment(
    slide: Path, out: Path, args: list[str], workers: int, model: str | None, pin_cores: int | None = None
) -> dict[str, Any]:
    """``wsiseg segment`` in a subprocess; its report plus process seconds and peak tree memory.

    ``pin_cores`` pins the process tree to the first ``pin_cores`` CPUs (wsiseg
    then sizes torch's threads to them).
    """
    from wsiseg.run.report import read_report

    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "wsiseg.cli", "segment", str(slide), "--out", str(out), "--quiet",
               "--workers", str(workers), *args]
    if model:
        command += ["--model", model]
    pin = (lambda: os.sched_setaffinity(0, set(range(pin_cores)))) if pin_cores else None
    watch = Stopwatch()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pin)
    peak = [0, 0]

    def sample() -> None:
        while process.poll() is None:
            rss, pss = _tree_memory(process.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.strip()}")
    report = read_report(out).to_dict()
    report["bench"] = {"process_seconds": watch.seconds, "peak_tree_rss_mb": peak[0] / 2**20,
                       "peak_tree_pss_mb": peak[1] / 2**20, "cores": pin_cores or cores(),
                       "command": "wsiseg " + " ".join(command[3:])}
    return report


def mask_dice(a: Path, b: Path) -> float:
    """Foreground Dice between two outputs' ``mask/0``, a band of chunks at a time (flat memory)."""
    import numpy as np
    import zarr

    from wsiseg.metrics import confusion, dice_iou

    first, second = zarr.open_array(str(a / "labels/mask/0"), mode="r"), zarr.open_array(str(b / "labels/mask/0"), mode="r")
    if first.shape != second.shape:
        raise ValueError("masks differ in shape")
    step = first.chunks[0] * 4
    counts = np.zeros((2, 2), np.int64)
    for y in range(0, first.shape[0], step):
        counts += confusion((first[y : y + step] > 0).astype(np.uint8), (second[y : y + step] > 0).astype(np.uint8), 2)
    return dice_iou(counts)[0]


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


def bundle_threshold(model: str | None) -> float:
    """The threshold ``wsiseg segment`` uses when given none: the bundle's."""
    from wsiseg.bundle import inspect_bundle, resolve_model
    from wsiseg.config import BundleSettings

    return BundleSettings.from_config(inspect_bundle(resolve_model(model))["config"]).flow.selection.value


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("timings", "task_seconds", "model_gflop", "tiles", "settings", "stage1", "working_resolution", "bench")
    return {k: report.get(k) for k in keys}


def breakdown(report: dict[str, Any]) -> dict[str, Any]:
    """Where a run's time goes, per stage, in worker-thread seconds (stage wall x worker threads).

    Inside tasks: model forward, read / decode, compose + write, context
    sampling; the rest of each stage's thread-seconds is scheduling, the
    driver and idle workers (the finish stage, run by the driver with a few
    tasks, and the set-up before stage 1 are counted there).
    """
    threads = int(report["scheduler"]["threads"])
    walls = report["timings"]
    tasks = report["task_seconds"]
    stages = {}
    for stage in ("stage1", "stage2"):
        if stage not in tasks:
            continue
        parts = tasks[stage]
        named = {
            "model forward": parts.get("model", 0.0),
            "read / decode": parts.get("read", 0.0),
            "compose + write": parts.get("compose", 0.0) + parts.get("write", 0.0),
            "context sampling": parts.get("context", 0.0),
        }
        available = walls[stage] * threads
        named["scheduling and idle"] = max(0.0, available - sum(named.values()))
        stages[stage] = {"wall_s": walls[stage], "thread_seconds": available, "parts_s": named}
    total = walls["total"] * threads
    inside = sum(sum(s["parts_s"].values()) for s in stages.values())
    model = sum(s["parts_s"]["model forward"] for s in stages.values())
    gflop = _total_gflop(report)
    return {
        "threads": threads,
        "wall_s": walls["total"],
        "process_s": report["bench"]["process_seconds"],
        "stages": stages,
        "outside_stages_s": {"setup and select": walls["total"] - sum(walls.get(k, 0.0) for k in ("stage1", "stage2", "finish")),
                             "finish": walls.get("finish", 0.0)},
        "model_share_of_wall": model / total,
        "model_share_of_process": model / (report["bench"]["process_seconds"] * threads),
        "unaccounted_thread_seconds": total - inside,
        "model_gflop": gflop,
        "gflops_per_thread": gflop / model if model else 0.0,
    }


# --------------------------------------------------------------------------- studies


def study_speed(
    slide: Path, thresholds: list[float], workers: int, model: str | None, scratch: Path, extra: tuple[str, ...] = (),
    two_stage_extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``extra``: ``wsiseg segment`` options for every run; ``two_stage_extra``: for the two-stage runs only."""
    full_out = scratch / "full.zarr"
    full = run_segment(slide, full_out, ["--full-resolution", *extra], workers, model)
    rows = [_row("full resolution", None, full, 1.0, None)]
    default_threshold = bundle_threshold(model)
    runs = sorted(set(thresholds) | {default_threshold})
    outputs = {t: (scratch / f"t{t:g}.zarr") for t in runs}
    reports = {t: run_segment(slide, outputs[t], ["--threshold", f"{t:g}", *extra, *two_stage_extra], workers, model)
               for t in runs}
    t0 = outputs.get(0.0)
    for t in runs:
        rows.append(_row("two-stage", t, reports[t], mask_dice(outputs[t], full_out),
                         mask_dice(outputs[t], t0) if t0 else None))
    return {"slide": str(slide), "workers": workers, "default_threshold": default_threshold, "rows": rows,
            "full_report": _brief(full), "default_report": _brief(reports[default_threshold]),
            "breakdown": breakdown(reports[default_threshold]), "baseline_breakdown": breakdown(full)}


def _row(run: str, threshold: float | None, report: dict[str, Any], dice_full: float, dice_t0: float | None) -> dict[str, Any]:
    domain, tissue = report.get("domain") or {}, report.get("tissue") or {}
    return {"run": run, "threshold": threshold, "refined": report["tiles"]["refined_fraction"],
            "refined_of_tissue": tissue.get("refined_fraction"), "median_score_of_tissue": domain.get("median_score"),
            "tissue_fraction": tissue.get("fraction"), "tissue_tiles": tissue.get("tiles"),
            "seconds": report["timings"]["total"], "process_seconds": report["bench"]["process_seconds"],
            "gflop": _total_gflop(report), "peak_tree_rss_mb": report["bench"]["peak_tree_rss_mb"],
            "dice_vs_full": dice_full, "dice_vs_t0": dice_t0}


def study_memory(slides: list[Path], workers: int, model: str | None, scratch: Path) -> dict[str, Any]:
    rows = []
    for slide in slides:
        out = scratch / f"{slide.stem}.zarr"
        report = run_segment(slide, out, [], workers, model)
        rows.append({"slide": slide.name, "size_yx": report["input"]["size_yx"], "seconds": report["timings"]["total"],
                     "refined": report["tiles"]["refined_fraction"],
                     "peak_tree_rss_mb": report["bench"]["peak_tree_rss_mb"],
                     "peak_tree_pss_mb": report["bench"]["peak_tree_pss_mb"]})
        shutil.rmtree(out)
    return {"workers": workers, "rows": rows}


def study_scaling(slide: Path, model: str | None, scratch: Path) -> dict[str, Any]:
    rows = []
    for workers, pinned in ((1, 1), (2, 2), (1, 2)):
        report = run_segment(slide, scratch / f"w{workers}c{pinned}.zarr", [], workers, model, pin_cores=pinned)
        rows.append({"workers": workers, "cores": pinned, "seconds": report["timings"]["total"],
                     "process_seconds": report["bench"]["process_seconds"],
                     "stage_seconds": {k: v for k, v in report["timings"].items() if k != "total"},
                     "refined": report["tiles"]["refined_fraction"], "gflop": _total_gflop(report)})
    return {"slide": str(slide), "rows": rows,
            "speedup_1_to_2_workers": rows[0]["process_seconds"] / rows[1]["process_seconds"],
            "speedup_stages": rows[0]["seconds"] / rows[1]["seconds"]}


def study_peer(slide: Path, region: int, workers: int, model: str | None, scratch: Path) -> dict[str, Any]:
    """MONAI sliding-window inference vs wsiseg on the same region, same model."""
    import tifffile

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
    del pixels
    full = run_segment(region_path, scratch / "region-full.zarr", ["--full-resolution"], workers, model)
    two = run_segment(region_path, scratch / "region-two.zarr", [], workers, model)
    halo, tile_size = full["settings"]["halo"], full["settings"]["tile_size"]
    monai_mask = scratch / "monai-mask.npy"
    monai = _monai_child("_monai", region_path, model, tile_size, halo, monai_mask)
    import numpy as np
    import zarr

    from wsiseg.metrics import dice

    theirs = np.load(monai_mask)
    ours = zarr.open_array(str(scratch / "region-full.zarr" / "labels/mask/0"), mode="r")[...] > 0
    agreement = dice(theirs.astype(np.uint8), ours.astype(np.uint8))
    return {
        "region": size, "slide": str(slide),
        "rows": [
            {"run": "MONAI sliding_window_inference (image in memory, 1 process, all cores)",
             "seconds": monai["seconds"], "process_seconds": monai["process_seconds"],
             "peak_rss_mb": monai["peak_rss_mb"]},
            _peer_row("wsiseg --full-resolution", full),
            _peer_row(f"wsiseg two-stage (default threshold {bundle_threshold(model):g})", two,
                      refined=two["tiles"]["refined_fraction"]),
        ],
        "dice_monai_vs_wsiseg_full": agreement,
    }


def _peer_row(run: str, report: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A peer study's row for a wsiseg run (:func:`run_segment`'s report): seconds and peak memory."""
    return {"run": run, "seconds": report["timings"]["total"], "process_seconds": report["bench"]["process_seconds"],
            "peak_rss_mb": report["bench"]["peak_tree_rss_mb"], **extra}


def _monai_child(mode: str, source: Path, model: str | None, tile: int, halo: int, out: Path) -> dict[str, Any]:
    """Run this file's MONAI ``mode`` (``_monai`` or ``_monai_wsi``) in a child process; its JSON line
    plus the child's process seconds."""
    watch = Stopwatch()
    child = subprocess.run(
        [sys.executable, __file__, mode, str(source), "--model", model or "wsiseg:default",
         "--tile", str(tile), "--halo", str(halo), "--out", str(out)],
        capture_output=True, text=True,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the MONAI run failed: {child.stderr.strip()[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["process_seconds"] = watch.seconds
    return result


def run_monai(region: Path, model: str, tile: int, halo: int, out: Path) -> None:
    """(In a child process.) MONAI sliding-window inference over a whole region held in memory."""
    import numpy as np
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    set_torch_threads()
    net = full_resolution_network(model)
    x = torch.from_numpy(tifffile.imread(region)).permute(2, 0, 1)[None].float() / 255
    with Stopwatch() as watch, torch.inference_mode():
        logits = sliding_window_inference(
            x, roi_size=(tile + 2 * halo, tile + 2 * halo), sw_batch_size=4,
            predictor=lambda batch: net(batch)[0], overlap=2 * halo / (tile + 2 * halo), mode="constant",
        )
    mask = (torch.sigmoid(logits[0, 0]) >= 0.5) if logits.shape[1] == 1 else logits[0].argmax(0) > 0
    np.save(out, mask.numpy())
    print(json.dumps({"seconds": watch.seconds, "peak_rss_mb": peak_rss_mb()}))


def study_wsi_peer(
    slide: Path, workers: int, model: str | None, scratch: Path, peers: list[str], tiatoolbox_python: str | None
) -> dict[str, Any]:
    """The whole slide through each of ``peers`` with the bundle's full-resolution network, against
    wsiseg's full-resolution and two-stage runs (both with their tissue mask):

    - ``monai``: MONAI's patch inferer (``WSISlidingWindowSplitter`` reading with OpenSlide,
      ``PatchInferer``, ``ZarrAvgMerger``), every patch (MONAI has no tissue mask);
    - ``tiatoolbox``: TIAToolbox 2.x's ``SemanticSegmentor`` with its tissue mask, run by
      ``benchmarks/peers/tiatoolbox_wsi.py`` under ``tiatoolbox_python`` (a separate environment).
    """
    import numpy as np
    import zarr

    from wsiseg.metrics import confusion, dice_iou

    full = run_segment(slide, scratch / "wsi-full.zarr", ["--full-resolution"], workers, model)
    two = run_segment(slide, scratch / "wsi-two.zarr", [], workers, model)
    halo, tile_size = full["settings"]["halo"], full["settings"]["tile_size"]
    ours = zarr.open_array(str(scratch / "wsi-full.zarr" / "labels/mask/0"), mode="r")

    def dice_vs_full(read_rows: Any) -> float:
        """Dice of a peer's mask (``read_rows(y0, y1)``: ``(rows, W)`` 0/1) against wsiseg's full-resolution mask."""
        counts = np.zeros((2, 2), np.int64)
        for y in range(0, ours.shape[0], 2048):
            theirs = read_rows(y, min(y + 2048, ours.shape[0]))
            counts += confusion(theirs.astype(np.uint8), (np.asarray(ours[y : y + 2048]) > 0).astype(np.uint8), 2)
        return float(dice_iou(counts)[0])

    rows, agreement = [], {}
    if "monai" in peers:
        merged = scratch / "monai-merged.zarr"
        monai = _monai_child("_monai_wsi", slide, model, tile_size, halo, merged)
        probabilities = zarr.open_array(str(merged), mode="r")  # (1, C, H, W)
        rows.append({"run": "MONAI PatchInferer + WSISlidingWindowSplitter (OpenSlide) + ZarrAvgMerger, every patch",
                     "seconds": monai["seconds"], "process_seconds": monai["process_seconds"],
                     "peak_rss_mb": monai["peak_rss_mb"], "patches": monai["patches"]})
        agreement["monai"] = dice_vs_full(
            lambda y0, y1: np.asarray(probabilities[0, 0, y0:y1, : ours.shape[1]]) >= 0.5)
    if "tiatoolbox" in peers:
        watch = Stopwatch()
        child = subprocess.run(
            [tiatoolbox_python, str(ROOT / "benchmarks" / "peers" / "tiatoolbox_wsi.py"), str(slide),
             model or "wsiseg:default", str(scratch / "tiatoolbox"), "--tile", str(tile_size), "--halo", str(halo)],
            capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"the TIAToolbox run failed: {child.stderr.strip()[-2000:]}")
        tia = json.loads(child.stdout.strip().splitlines()[-1])
        predictions = zarr.open_group(tia["zarr"], mode="r")["predictions"]  # (H, W)
        rows.append({"run": "TIAToolbox SemanticSegmentor (its tissue mask), OpenSlide", "seconds": tia["seconds"],
                     "process_seconds": watch.seconds, "peak_rss_mb": tia["peak_rss_mb"],
                     "patches": tia["patches"]})
        agreement["tiatoolbox"] = dice_vs_full(lambda y0, y1: np.asarray(predictions[y0:y1, : ours.shape[1]]) > 0)
    rows += [
        _peer_row("wsiseg --full-resolution (tissue tiles)", full),
        _peer_row(f"wsiseg two-stage (default threshold {bundle_threshold(model):g})", two,
                  refined_of_tissue=(two.get("tissue") or {}).get("refined_fraction")),
    ]
    return {
        "slide": str(slide),
        "rows": rows,
        "dice_peer_vs_wsiseg_full": agreement,
        "dice_two_stage_vs_full": mask_dice(scratch / "wsi-two.zarr", scratch / "wsi-full.zarr"),
    }


def run_monai_wsi(slide: Path, model: str, tile: int, halo: int, out: Path) -> None:
    """(In a child process.) MONAI's whole-slide patch inference, patches read from the file."""
    import torch
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter
    from monai.inferers.merger import ZarrAvgMerger

    set_torch_threads()
    net = full_resolution_network(model)
    window = tile + 2 * halo
    splitter = WSISlidingWindowSplitter(patch_size=window, overlap=2 * halo, reader="OpenSlide")
    inferer = PatchInferer(splitter=splitter, merger_cls=ZarrAvgMerger, batch_size=4, store=str(out),
                           preprocessing=lambda batch: batch.float() / 255.0)
    count = [0]

    def network(batch: torch.Tensor) -> torch.Tensor:
        count[0] += batch.shape[0]
        logits = net(batch)[0]
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)

    with Stopwatch() as watch, torch.inference_mode():
        inferer(str(slide), network)
    print(json.dumps({"seconds": watch.seconds, "patches": count[0], "peak_rss_mb": peak_rss_mb()}))


# --------------------------------------------------------------------------- printing


def markdown(study: str, result: dict[str, Any]) -> list[str]:
    """The study's result as Markdown lines, the command and the machine on top."""
    lines = header(result["command"], result["machine"])
    if study == "speed":
        full = result["rows"][0]
        lines.append("| run | threshold | refined tiles | refined tissue tiles | wall s (process) | speed-up | model GFLOP | "
                     "FLOP ratio | Dice vs full-res | Dice vs threshold 0 | peak RSS MB |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for row in result["rows"]:
            t = "" if row["threshold"] is None else f"{row['threshold']:g}"
            vs_t0 = "" if row["dice_vs_t0"] is None else f"{row['dice_vs_t0']:.4f}"
            of_tissue = "" if row.get("refined_of_tissue") is None else f"{100 * row['refined_of_tissue']:.1f} %"
            lines.append(f"| {row['run']} | {t} | {100 * row['refined']:.1f} % | {of_tissue} | {row['process_seconds']:.1f} | "
                         f"{full['process_seconds'] / row['process_seconds']:.2f}x | {row['gflop']:.0f} | "
                         f"{full['gflop'] / max(row['gflop'], 1e-9):.2f}x | {row['dice_vs_full']:.4f} | {vs_t0} | "
                         f"{row['peak_tree_rss_mb']:.0f} |")
        for name, title in (("breakdown", f"Default two-stage run (threshold {result['default_threshold']:g})"),
                            ("baseline_breakdown", "Full-resolution run")):
            b = result[name]
            lines.append(f"\n{title}: {b['wall_s']:.1f} s from planning to report ({b['process_s']:.1f} s for the "
                         f"process, cluster start included) x {b['threads']} worker threads")
            lines.append("\n| stage | wall s | model forward | read / decode | compose + write | context sampling | "
                         "scheduling and idle |\n|---|---|---|---|---|---|---|")
            for stage, s in b["stages"].items():
                parts = s["parts_s"]
                cells = " | ".join(f"{parts[k]:.1f} ({100 * parts[k] / s['thread_seconds']:.0f} %)" for k in parts)
                lines.append(f"| {stage} | {s['wall_s']:.1f} | {cells} |")
            outside = b["outside_stages_s"]
            lines.append(f"\nOutside the stages: set-up and selection {outside['setup and select']:.1f} s, finish "
                         f"(pyramid, overlay, report) {outside['finish']:.1f} s. Model forward passes: "
                         f"{100 * b['model_share_of_wall']:.1f} % of the run's thread-seconds "
                         f"({100 * b['model_share_of_process']:.1f} % of the process's). Convolutions: "
                         f"{b['model_gflop']:.0f} GFLOP at {b['gflops_per_thread']:.1f} GFLOP/s per thread.")
        lines.append(f"\nfp32 matmul peak (torch, 2048^2): {result['matmul_1thread']:.1f} GFLOP/s with 1 thread, "
                     f"{result['matmul_all']:.1f} GFLOP/s with all cores")
    elif study == "memory":
        lines += ["| slide | size | refined | wall s | peak RSS of the process tree MB | peak PSS MB |",
                  "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['slide']} | {row['size_yx'][1]} x {row['size_yx'][0]} | {100 * row['refined']:.1f} % | "
                         f"{row['seconds']:.1f} | {row['peak_tree_rss_mb']:.0f} | {row['peak_tree_pss_mb']:.0f} |")
    elif study == "scaling":
        lines.append("| workers | cores | wall s (process) | stages s |\n|---|---|---|---|")
        for row in result["rows"]:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stage_seconds"].items())
            lines.append(f"| {row['workers']} | {row['cores']} | {row['process_seconds']:.1f} | {stages} |")
        lines.append(f"\nspeed-up from 1 worker on 1 core to 2 workers on 2 cores: {result['speedup_1_to_2_workers']:.2f}x "
                     f"(process), {result['speedup_stages']:.2f}x (planning to report)")
    elif study == "wsi-peer":
        lines.append("| run | seconds | process seconds | peak RSS MB |\n|---|---|---|---|")
        for row in result["rows"]:
            lines.append(f"| {row['run']} | {row['seconds']:.1f} | {row['process_seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
        for peer, value in result["dice_peer_vs_wsiseg_full"].items():
            lines.append(f"\nDice of {peer}'s mask vs wsiseg's full-resolution mask: {value:.4f}")
        lines.append(f"\nDice of two-stage vs full resolution: {result['dice_two_stage_vs_full']:.4f}")
    elif study == "peer":
        lines += [f"region {result['region']} x {result['region']} pixels", "",
                  "| run | seconds | process seconds | peak RSS MB |", "|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['run']} | {row['seconds']:.1f} | {row['process_seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
        lines.append(f"\nDice of MONAI's mask vs wsiseg's full-resolution mask: {result['dice_monai_vs_wsiseg_full']:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    children = {"_monai": run_monai, "_monai_wsi": run_monai_wsi}
    if argv and argv[0] in children:  # a MONAI run in its own process (see _monai_child)
        parser = argparse.ArgumentParser()
        parser.add_argument("source", type=Path)
        for flag in ("--model", "--out"):
            parser.add_argument(flag, required=True)
        parser.add_argument("--tile", type=int, required=True)
        parser.add_argument("--halo", type=int, required=True)
        args = parser.parse_args(argv[1:])
        children[argv[0]](args.source, args.model, args.tile, args.halo, Path(args.out))
        return 0
    parser = make_parser(__doc__)
    parser.add_argument("study", choices=["speed", "memory", "scaling", "peer", "wsi-peer"])
    parser.add_argument("slides", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=cores())
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--region", type=int, default=4096)
    parser.add_argument("--peers", default="monai", help="wsi-peer: comma-separated, from monai and tiatoolbox")
    parser.add_argument("--tiatoolbox-python", default=None,
                        help="wsi-peer: the Python of a separate environment holding TIAToolbox 2.x")
    parser.add_argument("--no-tissue-mask", action="store_true", help="speed: runs without the tissue mask (the old behaviour)")
    parser.add_argument("--ratio", type=int, default=None,
                        help="speed: Model 1's downsampling factor for the two-stage runs (default: the bundle's)")
    add_results_argument(parser, "--out")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the runs' outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    unknown = set(args.peers.split(",")) - {"monai", "tiatoolbox"}
    if unknown:
        parser.error(f"unknown --peers {', '.join(sorted(unknown))}; choose from monai and tiatoolbox")
    if "tiatoolbox" in args.peers.split(",") and not args.tiatoolbox_python:
        parser.error("--peers tiatoolbox needs --tiatoolbox-python (see benchmarks/peers/tiatoolbox_wsi.py)")
    command = command_line(__file__, argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="wsiseg-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.study == "speed":
            extra = ("--no-tissue-mask",) if args.no_tissue_mask else ()
            ratio = ("--ratio", str(args.ratio)) if args.ratio else ()
            result = study_speed(args.slides[0], args.thresholds, args.workers, args.model, scratch, extra, ratio)
            result["matmul_1thread"] = matmul_peak_gflops(1)
            result["matmul_all"] = matmul_peak_gflops(cores())
        elif args.study == "memory":
            result = study_memory(args.slides, args.workers, args.model, scratch)
        elif args.study == "scaling":
            result = study_scaling(args.slides[0], args.model, scratch)
        elif args.study == "wsi-peer":
            result = study_wsi_peer(args.slides[0], args.workers, args.model, scratch, args.peers.split(","),
                                    args.tiatoolbox_python)
        else:
            result = study_peer(args.slides[0], args.region, args.workers, args.model, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result["machine"] = machine()
    result["command"] = command
    suffix = "-no-tissue-mask" if args.study == "speed" and args.no_tissue_mask else ""
    write_result(args.out, f"{args.study}-{args.slides[0].stem}{suffix}", result, markdown(args.study, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
