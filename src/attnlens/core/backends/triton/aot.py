"""Compile the ``triton`` backend's kernels for an NVIDIA architecture on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that they compile: it
runs ``tl`` operations in NumPy, so it accepts code that Triton's compiler refuses, and it says nothing
of registers or shared memory. Here every launch of a real `attnlens.attention` call (forward, the lens'
second pass, backward through autograd) is intercepted and compiled with Triton's own compiler, for the
target given, down to a cubin (ptxas included). Nothing runs: the call's tensors are CPU tensors and
its results are left uninitialised. Needs a process without ``TRITON_INTERPRET=1`` (the tests run it in a
subprocess).

    builds = compile_attention(arch=90, dtype=torch.bfloat16, n=4096, d=128, causal=True,
                               lens=Lens(topk=8), backward=True)
    for b in builds:
        print(b.kernel, b.registers, b.spill_bytes, b.shared_bytes, b.fits)

Each `KernelBuild` holds what a launch would need from the GPU: registers per thread, local memory
(spills), shared memory against the architecture's limit per block, and whether the dots became
Hopper ``wgmma`` or Ampere ``mma`` instructions. These are static facts of the binary, not timings.

Uses Triton's launch internals (``create_function_from_signature``, ``JITFunction._pack_args``): written
against triton 3.6 (pinned by the test extra); another version raises a RuntimeError naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ...api import attention  # tooling above the backend: compiles what a real call launches
from ...inputs import validate
from ...lens import Lens
from . import ops

#: shared memory one block may use (bytes): sm_80 163 KiB, sm_86/89/120 99 KiB, sm_90/100 227 KiB (CUDA
#: programming guide, "Compute Capabilities")
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
              120: 99 * 1024}
#: registers per thread the hardware allows on every architecture here
MAX_REGISTERS = 255


@dataclasses.dataclass
class KernelBuild:
    """One compiled launch: kernel name, its compile-time constants and the cubin's resource use."""

    kernel: str
    arch: int
    constants: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills / stack); 0 is what a fast kernel has
    shared_bytes: int  # dynamic shared memory per block
    tensor_core: str  # "wgmma" (Hopper warp-group MMA), "tcgen05" (sm_100), "mma" (Ampere-style), or "none"
    seconds: float  # compile time

    @property
    def max_shared(self) -> int:
        if self.arch not in MAX_SHARED:
            raise ValueError(f"no shared-memory limit known for sm_{self.arch}; known: {sorted(MAX_SHARED)}")
        return MAX_SHARED[self.arch]

    @property
    def fits(self) -> bool:
        """Whether a GPU of this architecture can launch it (shared memory and registers within limits)."""
        return self.shared_bytes <= self.max_shared and self.registers <= MAX_REGISTERS

    def row(self) -> dict:
        keep = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_BIAS", "WANT_ENT", "TOPK")
        return {"kernel": self.kernel, "sm": self.arch,
                "config": " ".join(f"{k}={v}" for k, v in self.constants.items() if k in keep),
                "warps": self.num_warps, "stages": self.num_stages, "regs": self.registers,
                "spill B": self.spill_bytes, "smem KiB": round(self.shared_bytes / 1024, 1),
                "fits": "yes" if self.fits else "NO", "mma": self.tensor_core, "compile s": round(self.seconds, 1)}


def _triton():
    try:
        import triton
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise RuntimeError("compiling the kernels needs triton (pip install triton==3.6.0)") from e
    return triton


def _compiled_module():
    """The kernels module in compile mode. Refused under TRITON_INTERPRET=1: once the interpreter has run a
    kernel it leaves triton.language patched for NumPy in this process, and Triton's code generator then fails."""
    if ops.interpret_mode():
        raise RuntimeError("compiling for a GPU needs a process without TRITON_INTERPRET=1 (the interpreter patches "
                           "triton.language in-process); run it in a fresh python with TRITON_INTERPRET unset")
    return ops.kernels_module()


def _resources(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, local bytes) of function ``name`` in a cubin, read with the cuobjdump Triton ships."""
    tool = Path(_triton().__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(f)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line for {name}:\n{out}")
    return int(m.group(1)), max(int(m.group(2)), int(m.group(3)))


def _compile(kernel, arch: int, args: tuple, kwargs: dict) -> KernelBuild:
    triton = _triton()
    if triton.__version__.split("+")[0] != "3.6.0":
        raise RuntimeError(f"attnlens.core.backends.triton.aot is written against triton 3.6.0, found {triton.__version__}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    t0 = time.perf_counter()
    compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    regs, local = _resources(compiled.asm["cubin"], kernel.__name__)
    ttgir = compiled.asm["ttgir"]
    mma = ("wgmma" if "warp_group_dot" in ttgir else "tcgen05" if "tc_gen5_mma" in ttgir
           else "mma" if "nvidia_mma" in ttgir else "none")
    names = [p.name for p in kernel.params]
    constants = {names[path[0]]: val for path, val in constexprs.items() if len(path) == 1 and
                 kernel.params[path[0]].is_constexpr}
    return KernelBuild(kernel.__name__, arch, constants, options.num_warps, options.num_stages, regs, local,
                       compiled.metadata.shared, mma, seconds)


@contextlib.contextmanager
def compile_launches(arch: int = 90):
    """Within the block, kernel launches of the triton backend compile for ``sm_<arch>`` instead of running;
    yields the list the `KernelBuild`s are appended to (one per launch, in launch order)."""
    mod = _compiled_module()
    builds: list[KernelBuild] = []

    def hook(name, args, kwargs):
        builds.append(_compile(getattr(mod, name), arch, args, kwargs))

    hook.arch = arch  # `ops.block_config` picks the block sizes for this target

    token = ops.launch_hook.set(hook)
    try:
        yield builds
    finally:
        ops.launch_hook.reset(token)


def compile_attention(*, arch: int = 90, dtype: torch.dtype = torch.bfloat16, batch: int = 1, heads: int = 4,
                      kv_heads: Optional[int] = None, n: int = 2048, nk: Optional[int] = None, d: int = 64,
                      dv: Optional[int] = None, causal: bool = False, window=None, key_padding: bool = False,
                      lens: Optional[Lens] = None, backward: bool = False, config: str = "",
                      softcap: Optional[float] = None, sinks: bool = False, alibi: bool = False,
                      seqlens: bool = False) -> list[KernelBuild]:
    """Compile, for ``sm_<arch>``, every kernel one `attnlens.attention` call with these arguments launches
    (the lens' column pass when ``lens`` asks for received/rows; the three backward kernels with ``backward``).

    Shapes matter through what Triton specialises on (divisibility by 16 of sizes and strides; a GQA group of
    1, i.e. ``kv_heads == heads``, compiles the dK/dV kernel's loop over query heads away) and through the block
    sizes `ops.block_config` picks from the head dims, dtype, architecture and group (``config``: overrides, as
    `ops.parse_config` reads them). ``softcap``, ``sinks`` and ``alibi`` compile the score modifications in;
    ``seqlens`` a padded batch's per-sequence lengths (sequence b of ``n - b`` queries and ``nk - 2b`` keys).
    Raises the backend's ValueError if it would refuse the call on a GPU.
    """
    nk = n if nk is None else nk
    dv = d if dv is None else dv
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.zeros(batch, heads, n, d, dtype=dtype, requires_grad=backward)
    k = torch.zeros(batch, kv_heads, nk, d, dtype=dtype, requires_grad=backward)
    v = torch.zeros(batch, kv_heads, nk, dv, dtype=dtype, requires_grad=backward)
    mask = torch.ones(batch, 1, 1, nk, dtype=torch.bool) if key_padding else None
    mods = dict(softcap=softcap, sinks=torch.zeros(heads, requires_grad=backward) if sinks else None,
                alibi_slopes=torch.ones(heads) if alibi else None)
    if seqlens:
        mods.update(seqlens_q=[max(0, n - b) for b in range(batch)],
                    seqlens_k=[max(0, nk - 2 * b) for b in range(batch)])
    with compile_launches(arch) as builds:
        inp = validate(q, k, v, mask=mask, causal=causal, window=window, lens=lens, **mods)
        backend = ops.TritonBackend(config=config)
        reasons = backend.not_supported_reasons(inp)
        if reasons:
            raise ValueError("the triton backend would refuse this call: " + "; ".join(reasons))
        out = attention(q, k, v, mask=mask, causal=causal, window=window, lens=lens, backend=backend, **mods)
        out = out[0] if lens is not None else out
        if backward:
            out.backward(torch.zeros_like(out))
    return builds
