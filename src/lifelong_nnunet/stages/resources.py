"""What a stage costs, measured while it happens: wall time, peak memory and the device, one record per session.

A run on real data is judged by its cost as much as by its Dice, and that cost cannot be rebuilt afterwards: it is
measured by the process that trains or evaluates, and stored through `RunFolder.record_session`. A run killed and
resumed is several sessions; each keeps its own entry, so the report adds them up instead of showing the last one.
"""
from __future__ import annotations

import os
import resource
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from ..run_folder import RunFolder


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process so far (``ru_maxrss``: it never falls, so a later stage of one process
    reports at least an earlier one's peak) and, on CUDA, peak GPU memory allocated by torch since the last reset
    (``Session`` resets it when a session starts), in MiB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def describe_device(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200)``: what the report names as the device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


@dataclass
class Session:
    """One process training (``phase`` "train") or evaluating ("evaluate") one stage. ``save()`` writes its entry
    (again): call it as often as the time spent so far is worth keeping (training: after every epoch)."""
    run: RunFolder
    stage: int
    phase: str
    device: torch.device
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        stamp = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        # unique even for two sessions of one process started within a second (runs called in-process)
        self.id = f"{stamp} pid {os.getpid()} {self.phase} {uuid.uuid4().hex[:8]}"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def seconds(self) -> float:
        return time.time() - self.started

    def save(self) -> None:
        peak = peak_memory_mb(self.device)
        self.run.record_session(self.stage, {"session": self.id, "phase": self.phase, "seconds": self.seconds,
                                             "peak_rss_mb": peak["peak_rss_mb"],
                                             "peak_gpu_mb": peak.get("peak_gpu_mb"),
                                             "device": describe_device(self.device)})

    def phase_seconds(self) -> float:
        """Seconds of every recorded session of this stage and phase (earlier, killed ones included)."""
        return sum(s["seconds"] for s in self.run.read_sessions(self.stage) or [] if s["phase"] == self.phase)
