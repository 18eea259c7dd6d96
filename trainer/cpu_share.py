"""A CPU training's thread count following the machine's other load (``train.cpu_threads: auto``).

Torch's intra-op threads spin while they wait for each other. On a 2-core machine a LoRA run of
SmolLM2-135M trained at 202 tokens/s on two threads and 137 on one while nothing else ran; with
one core kept busy by another process (a student server answering, the gateway) two threads fell
to 60 tokens/s and one held 124 (``bench/student_recipe.py --configs demo+steps12,...``, issue 15).
No fixed count is right for a training that shares its machine with a student server whose
traffic comes and goes, so between optimizer steps this looks at how much CPU the other processes
used during the last step (``/proc/stat`` less this process's own time) and trains on the cores
they left: all of them while the rest of the machine is idle, one fewer per core kept busy.

The embedded student server does the same between decode steps (``distillgate student serve
--threads auto``): it answers on both cores while no training runs, on one while one does.

Thread counts only change between steps, so a step's arithmetic never mixes them; runs that must
repeat bit for bit keep a fixed count (the default).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_CORE = 0.5
"""Other processes' use, in cores, from which a core counts as taken: the demo's gateway, teacher
and client together used ~0.2-0.3 of a core at 6 requests/s; a student server decoding uses one."""

PROC_STAT = Path("/proc/stat")

MIN_WINDOW_S = 0.2
"""The shortest window ``CpuShare`` judges the machine's load over: ``/proc/stat`` counts in 10 ms
ticks, so a few-millisecond window reads a busy core as idle or as two (a test on the tiny model,
whose steps take milliseconds, saw 1, 2, 1, 2 threads under one steady busy core)."""

CPU_BF16_MIN_HIDDEN = 512
"""Hidden width from which bf16 pays on a CPU with native bf16 matmuls: below it, casts cost more
than the matmuls save (the tiny test models are 64 wide)."""


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AMX tiles or AVX512-BF16), as oneDNN uses them."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``; None off Linux)."""
    try:
        first = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal = ticks[7] if len(ticks) > 7 else 0  # another guest's time, not ours to use
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already counted in user/nice
    return (sum(ticks) - idle - steal - guest) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used (all its threads)."""
    t = os.times()
    return t.user + t.system


class CpuShare:
    """Picks the thread count for the next optimizer step from the cores others used in the last."""

    def __init__(
        self, cores: int | None = None, *, min_interval_s: float = MIN_WINDOW_S, probe_s: float = 0.0
    ) -> None:
        """``probe_s``: watch the machine this long before the first step, so that the first
        step already runs on the cores left (a training; 0: start on all of them)."""
        self.cores = max(1, cores or len(os.sched_getaffinity(0)))
        self.min_interval_s = min_interval_s
        """``pick`` keeps the count until this long since its last look (a decode step is ~50 ms,
        a tiny model's optimizer step a few: too short to tell another process's load from
        noise, as ``/proc/stat`` counts in 10 ms ticks)."""
        self.threads = self.cores
        self.changes = 0
        self._last = self._sample()
        if probe_s > 0 and self.available:
            time.sleep(probe_s)
            self._decide()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        return time.monotonic(), machine_busy_s(), own_cpu_s()

    @property
    def available(self) -> bool:
        """Whether the machine's load can be read here (Linux)."""
        return self._last[1] is not None

    def others_cores(self) -> float | None:
        """Cores the other processes kept busy since the last call (None: unknown)."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        if busy0 is None or busy1 is None or t1 - t0 <= 0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)

    def pick(self) -> int:
        """The threads for the next step (and sets torch's count to it when it changes)."""
        if self.min_interval_s and time.monotonic() - self._last[0] < self.min_interval_s:
            return self.threads
        return self._decide()

    def _decide(self) -> int:
        others = self.others_cores()
        if others is None:
            return self.threads
        taken = 0 if others < BUSY_CORE else max(1, round(others))
        want = max(1, self.cores - taken)
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
            log.info(
                "training threads %d -> %d (other processes used %.2f cores)", self.threads, want, others
            )
            self.threads, self.changes = want, self.changes + 1
        return want
