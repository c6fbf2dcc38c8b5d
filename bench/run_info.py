"""What a bench run records beside its figures: the machine and code it ran on, and the time
of each section (one failing section recorded, the next going on)."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

import torch


class Sections:
    """Timestamps every section and keeps going past a failing one."""

    def __init__(self, results: dict):
        self.results = results
        self.t0 = time.perf_counter()

    def stamp(self) -> str:
        return f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - self.t0:6.1f}s]"

    @contextlib.contextmanager
    def section(self, name: str):
        print(f"{self.stamp()} == {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one failing section must not stop the run
            traceback.print_exc()
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
        finally:
            synchronize()
            self.results["section_seconds"][name] = time.perf_counter() - t0
            print(f"{self.stamp()} .. {name} done in {time.perf_counter() - t0:.1f} s", flush=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def describe_environment(device: torch.device) -> dict:
    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for module in ("triton", "transformers", "batchgen"):
        try:
            env[module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001
            env[module] = f"unavailable ({type(e).__name__})"
    env["cpu"] = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                       if line.startswith("model name")), platform.processor())
    env["num_cpus"] = os.cpu_count()
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if device.type == "cuda":
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    env["git_sha"] = os.environ.get("BATCHGEN_GIT_SHA") or _git_describe()
    return env


def _git_describe() -> str | None:
    # --dirty: a copied working tree (the device machine's) can carry an older .git; the
    # suffix then says the code is not that commit's (BATCHGEN_GIT_SHA names the commit then).
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
