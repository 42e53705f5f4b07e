"""How a network runs on this machine: device, precision, memory layout, CPU threads and allocator.

Measured on a 2-core Xeon (``benchmarks/train_throughput.py``; MobileNetV2 / ResNet18, batch 32,
224 px): channels_last is 1.5-2x faster than NCHW for all three architectures, glibc's default
allocator costs a further 20-40 % (every large activation is a fresh mmap whose pages the kernel
zeroes again at each step), and bf16 autocast is 2-3x *slower* where the CPU has no native bf16
(emulated), while on CPUs with AMX / AVX512-BF16 it adds 1.5-2.5x. So ``auto`` picks channels_last
everywhere and bf16 only where it is native; an explicit ``bf16`` on other CPUs is refused. On CUDA
the mixed precision is what it was (bf16 where supported, else fp16 with a gradient scaler).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mammacls.archs import ARCH_SPECS
from mammacls.choices import MemoryFormat, Precision, parse_choice
from mammacls.errors import MammaclsError, param


@dataclass(frozen=True)
class Compute:
    """The settings one process runs a network with (recorded in the model card)."""

    device: str  # cpu, cuda, cuda:1
    precision: str  # fp32, bf16 or fp16 (the autocast dtype; fp32: no autocast)
    memory_format: str  # channels-last or contiguous
    threads: int | None = None  # CPU: torch's intra-op threads
    cpu_native_bf16: bool | None = None  # CPU: AMX or AVX512-BF16 present
    allocator: str | None = None  # CPU: how the allocator was tuned, if it was

    @property
    def torch_memory_format(self):
        import torch

        return torch.channels_last if self.memory_format == MemoryFormat.channels_last.value else torch.contiguous_format

    def autocast(self):
        """The autocast context of this precision on this device (a no-op for fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    def describe(self) -> str:
        parts = [self.device, self.precision, self.memory_format]
        if self.threads:
            parts.append(f"{self.threads} threads")
        if self.device == "cpu" and self.cpu_native_bf16 is not None:
            parts.append("native bf16" if self.cpu_native_bf16 else "no native bf16")
        return ", ".join(parts)

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (Intel AMX or AVX512-BF16; Arm BF16 where torch says so)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    found = [getattr(torch.cpu, name)() for name in probes if callable(getattr(torch.cpu, name, None))]
    if found:
        return any(found)
    flags = _cpuinfo_flags()  # older torch: the kernel's list
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def choose_compute(arch: str, device: str, precision: str | Precision = "auto",
                   memory_format: str | MemoryFormat = "auto", *, training: bool = True) -> Compute:
    """The fastest settings for ``arch`` on ``device`` (a resolved device: cpu, cuda, cuda:K), or what was asked.

    Inference (``training=False``) stays fp32 on the CPU whatever ``precision`` says: predict's two
    backends must agree within 1e-4, which bf16 would break.
    """
    precision = parse_choice(Precision, precision, "precision")
    memory_format = parse_choice(MemoryFormat, memory_format, "memory_format")
    spec = ARCH_SPECS[arch]
    cuda = device.startswith("cuda")
    if memory_format == MemoryFormat.auto:
        # channels_last suits cuDNN's tensor cores, and measured faster on CPUs for every architecture
        memory_format = MemoryFormat.channels_last if cuda or spec.cpu_channels_last else MemoryFormat.contiguous
    if cuda:
        return Compute(device, _cuda_precision(precision), memory_format.value)
    native = cpu_has_native_bf16()
    if precision == Precision.bf16 and not native:
        raise MammaclsError(f"{param('precision')} bf16: this CPU has no native bf16 (AMX or AVX512-BF16), where "
                            "emulated bf16 is 2-3x slower than fp32; use auto or fp32")
    chosen = precision.value if precision != Precision.auto else ("bf16" if native and spec.cpu_bf16 else "fp32")
    threads = tune_cpu_threads()
    return Compute(device, chosen if training else "fp32", memory_format.value, threads=threads,
                   cpu_native_bf16=native, allocator=tune_cpu_allocator())


def _cuda_precision(precision: Precision) -> str:
    import torch

    if precision == Precision.fp32:
        return "fp32"
    bf16 = torch.cuda.is_bf16_supported()
    if precision == Precision.bf16 and not bf16:
        raise MammaclsError(f"{param('precision')} bf16: this GPU has no bf16; use auto (fp16) or fp32")
    return "bf16" if bf16 else "fp16"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def tune_cpu_threads() -> int:
    """torch's intra-op threads: its default (the physical cores) unless that exceeds the CPUs this
    process may use, where extra threads only wait on each other; OMP_NUM_THREADS, when set, wins."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        wanted = min(torch.get_num_threads(), usable_cpus())
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
    return torch.get_num_threads()


_ALLOCATOR_NOTE: list[str | None] = []
ALLOCATOR_ENV = "MAMMACLS_CPU_ALLOCATOR"


def tune_cpu_allocator() -> str | None:
    """Keep large CPU blocks in glibc's heap instead of a fresh mmap per allocation (once per process).

    glibc serves blocks above its mmap threshold (at most 32 MiB) with mmap and returns them at free,
    so a training step's activations are mapped and page-faulted anew every step: 20-40 % of a
    CPU step here. Raising the threshold and the trim limit keeps them mapped (a few hundred MiB
    more resident). Not glibc (macOS, Windows, musl): nothing to do. ``MAMMACLS_CPU_ALLOCATOR=default``
    leaves the allocator as it is (tight memory, or to measure the difference).
    """
    if _ALLOCATOR_NOTE:
        return _ALLOCATOR_NOTE[0]
    note = None
    if os.environ.get(ALLOCATOR_ENV, "").lower() == "default":
        _ALLOCATOR_NOTE.append(note)
        return note
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1):
            note = "glibc: mmap threshold 1 GiB, trim threshold 2 GiB"
    except (OSError, AttributeError):
        pass
    _ALLOCATOR_NOTE.append(note)
    return note


def to_layout(net, compute: Compute):
    """``net`` on ``compute``'s device in its memory format."""
    return net.to(compute.device, memory_format=compute.torch_memory_format)
