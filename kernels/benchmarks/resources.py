"""Registers, spills and shared memory of a compiled Triton kernel, without a GPU.

Runs the ptxas that ships with Triton on the kernel's PTX (`ptxas -v`). Spilled registers go to local
memory and are a common reason a kernel falls far below the card's rate, so this is the first thing
to read after a kernel change when no GPU is at hand (`bench_wkv7 --compile-only` prints it).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def _ptxas_candidates():
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # newer Triton emits PTX that only its Blackwell-era ptxas accepts
    return [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]


def ptxas_report(compiled, arch: str = "sm_90a") -> str:
    """'regs R, spills S B, smem M B' for a kernel returned by triton.compile (or why it is unknown)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for exe in _ptxas_candidates():
            if not os.path.exists(exe):
                continue
            out = subprocess.run([exe, f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                regs = re.search(r"Used (\d+) registers", out.stderr)
                spills = re.search(r"(\d+) bytes spill stores", out.stderr)
                return (f"regs {regs.group(1) if regs else '?'}, spills {spills.group(1) if spills else '?'} B, "
                        f"smem {compiled.metadata.shared} B")
    return "ptxas report unavailable"
