"""Helpers shared by the bench scripts: child-process RSS polling, inputs, machine description, RESULTS.md sections.

Not a benchmark.  The scripts import it as a sibling, which works both for ``python bench/xyz.py`` and when a
script is imported from elsewhere::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import measure, record
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


# ------------------------------------------------------------------------------------------------ /proc polling


def proc_status(pid: int) -> dict[str, int]:
    """The ``STATUS_KEYS`` lines of ``/proc/<pid>/status``, in bytes (empty when the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/*/children)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return seen


def tree_rss(pid: int) -> tuple[int, int, int]:
    """(summed ``RssAnon``, summed ``VmRSS`` over ``pid`` and its descendants, ``VmHWM`` of ``pid`` itself)."""
    anon = rss = hwm = 0
    for p in proc_tree(pid):
        s = proc_status(p)
        anon += s.get("RssAnon", 0)
        rss += s.get("VmRSS", 0)
        if p == pid:
            hwm = s.get("VmHWM", 0)
    return anon, rss, hwm


@dataclass
class Run:
    """One measured child process (memory in bytes)."""

    label: str
    wall_s: float = 0.0
    peak_anon: int = 0
    peak_rss: int = 0
    hwm: int = 0
    ru_maxrss: int = 0
    samples: int = 0
    output: str = ""  # the child's stdout + stderr


def _poll(run: Run, pid: int, stop: threading.Event, interval: float) -> None:
    """Update ``run``'s peaks from ``tree_rss(pid)`` every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        anon, rss, hwm = tree_rss(pid)
        run.hwm = max(run.hwm, hwm)
        run.peak_anon, run.peak_rss = max(run.peak_anon, anon), max(run.peak_rss, rss)
        run.samples += 1
        stop.wait(interval)


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a measured child: offline HF, no tokenizer threads, this repo on ``PYTHONPATH`` and, when
    ``threads`` is given, ``OMP_NUM_THREADS``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def measure(label: str, cmd: list[str], env: dict[str, str], cwd: Path = REPO, interval: float = 0.02) -> Run:
    """Run ``cmd`` as a child process, polling its tree's RSS every ``interval`` s; wall time, peaks, ``ru_maxrss``
    (from ``os.wait4``).  Exits with the output's tail when the child fails."""
    run, stop = Run(label), threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    th = threading.Thread(target=_poll, args=(run, proc.pid, stop, interval), daemon=True)
    th.start()
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    run.wall_s = time.perf_counter() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.output = out.decode(errors="replace")
    if proc.returncode != 0:
        sys.stdout.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"{label} failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    run.ru_maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    run.peak_rss = max(run.peak_rss, run.hwm)
    return run


def alternating(reps: int, first: str, second: str) -> list[str]:
    """Order of ``reps`` runs of each label, alternating which goes first: first, second, second, first, ..."""
    order: list[str] = []
    for rep in range(reps):
        order += [first, second] if rep % 2 == 0 else [second, first]
    return order


# ------------------------------------------------------------------------------------------------ inputs


def venv_exe(name: str) -> str | None:
    """Console script ``name`` of this interpreter's environment, else from ``PATH``, else None."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def warm_page_cache(folders: Iterable[Path]) -> None:
    """Read every ``*.safetensors`` of ``folders`` once, so that a first timed run does not pay for cold reads."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def tensor_index(folder: Path) -> dict[str, Path]:
    """{tensor name: the ``*.safetensors`` file of ``folder`` that holds it}."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})  # noqa: SIM118
    return out


def n_params(folder: Path) -> int:
    """Number of tensor entries in the ``*.safetensors`` files of ``folder``."""
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())  # noqa: SIM118
    return total


# ------------------------------------------------------------------------------------------------ report


def mib(n: float) -> str:
    """``n`` bytes as whole MiB, e.g. ``1,234 MiB``."""
    return f"{n / 2**20:,.0f} MiB"


def loadavg() -> str:
    """The 1/5/15-minute load averages as in /proc/loadavg, e.g. ``0.52 0.61 0.70``."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model(default: str = "unknown cpu") -> str:
    """The first ``model name`` of /proc/cpuinfo, or ``default``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def mem_gib() -> int:
    """``MemTotal`` of /proc/meminfo in whole GiB (0 when unreadable)."""
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 2**20
    except OSError:
        pass
    return mem


def mergekit_version() -> str:
    """Installed mergekit version, or ``?``."""
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:  # noqa: BLE001
        return "?"


def host() -> str:
    """``node: cpu, N CPUs, M GiB RAM; Python x.y.z``."""
    return (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs, {mem_gib()} GiB RAM; "
            f"Python {platform.python_version()}")


def machine() -> str:
    """``host()`` with torch (and its thread count) and mergekit versions."""
    import torch

    return f"{host()}, torch {torch.__version__} (threads {torch.get_num_threads()}), mergekit {mergekit_version()}"


def machine_with_transformers(threads: int | None = None) -> str:
    """``host()`` with torch (and ``threads`` when given), transformers and mergekit versions."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bf16_emulation import note as bf16_note  # tools/ is no package (the benches run its scripts too)

    return (f"{host()}, torch {torch.__version__}{'' if threads is None else f' ({threads} intra-op threads)'}, "
            f"transformers {transformers.__version__}, mergekit {mergekit_version()}; {bf16_note()}")


def record(entry: str, heading: str, results: Path = RESULTS) -> None:
    """Append ``entry`` at the end of the ``heading`` section of ``results`` (section and file created when
    missing; other sections untouched)."""
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if heading not in lines:
        lines += ["", heading]
        end = len(lines)
    else:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:end] + ["", *entry.rstrip("\n").split("\n")] + ([""] + lines[end:] if end < len(lines) else [])
    results.write_text("\n".join(new) + "\n")
