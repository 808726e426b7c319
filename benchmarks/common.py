"""Shared benchmark plumbing: synchronised timing with warm-up (CUDA events on GPU), median and spread,
peak extra memory, machine/version info, a table on stdout and a JSON file under benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What a reader needs to reproduce a number: CPU/GPU, threads, library versions, date."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # Other work on the machine distorts timings; the 1-minute load average tells the reader how quiet it was.
        "load_avg_1min": os.getloadavg()[0],
    }
    for mod in ("transformers", "numpy", "faiss", "hnswlib", "pyrag"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except ImportError:
            continue  # not installed: nothing to report
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        here = Path(__file__).parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              check=False).stdout.strip()
        # Uncommitted changes to tracked files mean the numbers come from code no commit holds: say so.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=False).stdout.strip()
        info["git"] = head + ("-dirty" if head and dirty else "")
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 2, repeat: int = 10,
            min_seconds: float = 0.0) -> dict:
    """Median / min / IQR of fn() in milliseconds, synchronised (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_seconds:
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iqr_ms": q[2] - q[0], "runs": len(times)}


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def peak_extra_memory(fn: Callable[[], object], device="cpu") -> int:
    """Bytes fn() needs beyond what was allocated before it ran (its outputs included).

    GPU: torch.cuda.max_memory_allocated over the call. CPU: the process's peak RSS, reset first through
    /proc/self/clear_refs, minus the RSS before the call (Linux only; freed pages are returned to the OS by
    glibc for large blocks, which is what torch's CPU allocator uses for big tensors)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_bytes()
    out = fn()
    peak = _hwm_bytes() - before
    del out
    return max(peak, 0)


def write_results(name: str, rows: list[dict], extra: dict | None = None, out: str | Path | None = None) -> Path:
    """Write {machine, rows, ...} as benchmarks/results/<name>.json (or out) atomically, return the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **(extra or {}), "rows": rows}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of the given columns (floats with 3 significant decimals)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
