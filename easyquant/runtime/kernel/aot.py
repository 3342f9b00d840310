"""Compile :mod:`easyquant.runtime.kernel`'s launches ahead of time for an NVIDIA GPU that is not here.

A launch described by :func:`~easyquant.runtime.kernel.plan_qmatmul` (built from CPU tensors of the
right dtypes and shapes) is specialised exactly as Triton's JIT would specialise it on the GPU
(argument types, 16-byte alignment and divisibility, ints equal to 1 as constants), compiled
to a cubin for the chosen architecture with the ``ptxas`` that ships in Triton's wheel, and
read back with the ``cuobjdump`` and ``nvdisasm`` that ship beside it: registers, local
memory (spills), shared memory and which machine instructions the kernel uses (tensor-core
MMAs, global load widths, asynchronous copies, warp shuffles, atomics). That proves the kernels compile for the
GPU and shows what the compiler made of each tile shape; it says nothing of speed.

Needs Triton's compiler, so ``TRITON_INTERPRET`` must be off when :mod:`easyquant.runtime.kernel`
is imported: run it in its own process (``bench/compiled.py`` does).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...errors import EasyQuantError
from .launch import INTERPRETED, Launch

# Opcode families worth counting in SASS, by the prefix of the mnemonic.
TENSOR_CORE_OPS = ("HGMMA", "HMMA")  # Hopper warpgroup MMA; warp-level MMA
_REG_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


@dataclass(frozen=True)
class CompiledLaunch:
    """What ``ptxas`` made of one launch: per-thread registers and stack (``stack_bytes`` above 0
    means spills to local memory), shared memory per program, and SASS opcode counts."""

    kernel: str
    num_warps: int
    registers: int
    stack_bytes: int
    shared_bytes: int
    opcodes: Counter

    def count(self, *prefixes: str) -> int:
        """Static count of instructions whose mnemonic starts with any of ``prefixes``."""
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefixes))

    def global_loads(self) -> dict[int, int]:
        """Static count of global loads, plain and asynchronous (``LDGSTS``), by width in bits
        (``LDG.E.128`` -> 128; ``LDG.E`` -> 32)."""
        widths: Counter = Counter()
        for op, n in self.opcodes.items():
            if op.startswith(("LDG.", "LDGSTS.")):
                size = re.search(r"\.(U8|S8|U16|S16|64|128)\b", op)
                widths[{"U8": 8, "S8": 8, "U16": 16, "S16": 16}.get(size.group(1), 0) or int(size.group(1))
                       if size else 32] += n  # fmt: skip
        return dict(sorted(widths.items()))

    def pipelined(self) -> bool:
        """Whether global loads are issued ahead as asynchronous copies (cp.async or TMA)."""
        return self.count("LDGSTS", "UTMALDG") > 0

    def tensor_cores(self) -> str:
        """The tensor-core instruction family used (``HGMMA``, ``HMMA``) or ``"-"``."""
        used = [op for op in TENSOR_CORE_OPS if self.count(op)]
        return ",".join(used) or "-"

    def warps_per_sm_by_registers(self) -> int:
        """Resident warps one SM's 64K registers allow (allocation in 8-register steps, 64 at most)."""
        per_warp = -(-self.registers // 8) * 8 * 32
        return min(64, 65536 // per_warp // self.num_warps * self.num_warps)


def _specialize(launch: Launch) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes as Triton's JIT derives them from the arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = launch.kernel.arg_names
    runtime = [n for n in names if n not in launch.constexprs]
    if len(runtime) != len(launch.args):
        raise EasyQuantError(f"{launch.kernel.__name__}: {len(launch.args)} arguments for parameters {runtime}")
    signature, constants, attrs = {}, dict(launch.constexprs), {}
    for name, arg in zip(runtime, launch.args, strict=True):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = spec
        elif spec:
            attrs[(names.index(name),)] = BaseBackend.parse_attr(spec)
    for name in launch.constexprs:
        signature[name] = "constexpr"
    return {n: signature[n] for n in names}, constants, attrs


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_launch(launch: Launch, arch: int = 90) -> CompiledLaunch:
    """Compile ``launch`` for ``sm_<arch>`` (90: H100/H200) and read the cubin back."""
    if INTERPRETED:
        raise EasyQuantError("ahead-of-time compilation needs Triton's compiler: import easyquant.runtime.kernel "
                             "with TRITON_INTERPRET unset (run it in its own process)")  # fmt: skip
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _specialize(launch)
    compiled = triton.compile(
        ASTSource(launch.kernel, signature, constexprs=constants, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs, stack = map(int, _REG_LINE.search(usage).groups())
    return CompiledLaunch(
        kernel=launch.kernel.__name__, num_warps=launch.num_warps, registers=regs, stack_bytes=stack,
        shared_bytes=compiled.metadata.shared, opcodes=Counter(_SASS_OP.findall(sass)),
    )  # fmt: skip
