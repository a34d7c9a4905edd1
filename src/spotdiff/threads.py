"""The intra-op thread count of CPU work (set by the CLI, not on import).

torch's default is one thread per core, onnxruntime's one per physical core. On a machine that other
jobs keep busy, those threads spin and wait for each other and a run gets slower, not faster
(``benchmarks/RESULTS.md``, "Threads that help": 2 threads against 1 on 2 cores at load 6-11, fit
3.9x and predict 7.6x slower); more threads than the cores this process may run on (``taskset``, a
container's CPU set) can only time-slice. spotdiff therefore uses the
cores of its CPU set that are idle when the command starts (:func:`rule_threads`): the 1-min load
average is spread over the machine's cores, its share of this process's cores is taken as busy, and
the rest (rounded, at least 1) get a thread each. Order of precedence (first that is set wins):

1. ``--threads N`` (global CLI flag);
2. ``SPOTDIFF_THREADS=N`` in the environment;
3. ``OMP_NUM_THREADS=N`` in the environment (torch has already applied it; spotdiff leaves it);
4. the rule above.

onnxruntime's session gets the same count (:func:`session_threads`, intra-op; onnxruntime runs a
detector graph sequentially, without inter-op threads), so ``--threads`` means the same for both back ends and the
two are never both set to use all cores in one process.
"""

from __future__ import annotations

import math
import os
import sys

from spotdiff.errors import ConfigError

ENV_VAR = "SPOTDIFF_THREADS"


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rule_threads(cores: int, machine_cores: int, load: float) -> int:
    """The thread rule: threads for a process that may run on ``cores`` of the machine's
    ``machine_cores``, at 1-min load average ``load`` (runnable tasks over the whole machine).

    ``load * cores / machine_cores`` of this process's cores count as busy; each remaining core
    (rounded half up) gets one thread; at least 1, at most ``cores``.
    """
    cores = max(1, cores)
    busy_here = max(0.0, load) * cores / max(cores, machine_cores)
    return max(1, min(cores, cores - math.floor(busy_here + 0.5)))


def idle_cores() -> int:
    """:func:`rule_threads` for this process now (its CPU set, the machine's cores, the load average)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return rule_threads(cpu_cores(), os.cpu_count() or 1, load)


def _parse(value: str | int, source: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError(f"{source}={value!r}: the thread count must be an integer >= 1")
    return n


def choose_threads(flag: int | None = None) -> tuple[int | None, str]:
    """The thread count to set and why: ``(n, reason)``; ``n`` is None when OMP_NUM_THREADS rules."""
    if flag is not None:
        return _parse(flag, "--threads"), "--threads"
    if os.environ.get(ENV_VAR):
        return _parse(os.environ[ENV_VAR], ENV_VAR), ENV_VAR
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    return idle_cores(), "idle cores"


_applied: int | None = None
"""The count :func:`apply_threads` chose in this process (None before it ran)."""


def apply_threads(flag: int | None = None, torch: bool = True) -> int:
    """Choose the intra-op thread count by :func:`choose_threads` and return it; with ``torch``, set
    torch's count to it (when ``OMP_NUM_THREADS`` rules, torch's own count is kept and returned).
    ``torch=False`` leaves torch unimported: a torch-free command (``predict --backend onnxruntime``)
    only needs the count for its onnxruntime session (:func:`session_threads`)."""
    global _applied
    n, _ = choose_threads(flag)
    if torch:
        import torch as torch_module

        if n is not None and n != torch_module.get_num_threads():
            torch_module.set_num_threads(n)
        n = torch_module.get_num_threads()
    elif n is None:  # OMP_NUM_THREADS rules: the count torch would take from it
        n = _parse(os.environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
    _applied = n
    return n


def session_threads() -> int:
    """Intra-op threads for an onnxruntime session, so that both back ends run on the same cores: the
    count :func:`apply_threads` chose; before it ran, torch's count if torch is imported, else the
    count :func:`apply_threads` would choose (torch is not imported here)."""
    if _applied is not None:
        return _applied
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        return max(1, int(torch_module.get_num_threads()))
    n, _ = choose_threads()
    return n if n is not None else _parse(os.environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
