"""Compile Triton kernels for a GPU without one, and report their registers, spills and shared memory.

`Compiler.build` compiles one kernel variant for sm_90 (catching what the CPU interpreter cannot);
`ptxas_report` runs the ptxas that ships with Triton on its PTX (`ptxas -v`). Spilled registers go
to local memory and are a common reason a kernel falls far below the card's rate, so this is the
first thing to read after a kernel change when no GPU is at hand (`--compile-only` of both benchmarks).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile


def _ptxas_candidates():
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # newer Triton emits PTX that only its Blackwell-era ptxas accepts
    return [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]


def tensor_core_path(ptx: str) -> str:
    """Which matrix instructions the PTX uses: Hopper's warpgroup `wgmma` (the fast path, needs 64-row
    tiles per warpgroup) or the older per-warp `mma.sync`, by count; and whether loads are pipelined
    (`cp.async` count)."""
    wgmma = ptx.count("wgmma.mma_async")
    mma = len(re.findall(r"\bmma\.sync", ptx))
    return f"wgmma {wgmma}, mma.sync {mma}, cp.async {ptx.count('cp.async.')}"


def ptxas_report(compiled, arch: str = "sm_90a") -> str:
    """'regs R, spills S B, smem M B, wgmma W, mma.sync M, cp.async C' for a kernel returned by
    triton.compile."""
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
                        f"smem {compiled.metadata.shared} B, {tensor_core_path(compiled.asm['ptx'])}")
    return f"ptxas report unavailable, {tensor_core_path(compiled.asm['ptx'])}"


class Compiler:
    """Compiles kernel variants for sm_<arch>, printing one line each; counts the failures."""

    def __init__(self, arch: int = 90):
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--compile-only needs TRITON_INTERPRET unset")
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.failures = 0

    def build(self, fn, types, consts, num_warps, name, num_stages=3, maxnreg=0):
        """types: argument -> Triton type ("*fp32", "i32", ...); unlisted pointers are bf16 and a type of
        None makes the argument a constexpr None (an absent optional tensor).

        Every pointer and integer argument is compiled as divisible by 16, as the launcher specializes
        them for 16-byte-aligned tensors and sizes that are multiples of 16 (all benchmark shapes).
        Without that, Triton cannot prove loads aligned, does not pipeline them through cp.async, and
        the registers, spills and shared memory reported are not those of the kernel that runs."""
        import triton
        from triton.compiler import ASTSource

        consts = dict(consts)
        for param in getattr(fn, "params", ()):  # constexpr defaults the caller left out, as a launch applies them
            if param.is_constexpr and param.name not in consts and param.default is not inspect.Parameter.empty:
                consts[param.name] = param.default
        sig = {}
        for a in fn.arg_names:
            t = "constexpr" if a in consts else types.get(a, "*bf16")
            if t is None:
                t, consts[a] = "constexpr", None
            sig[a] = t
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or sig[a] in ("i32", "i64")}
        source = ASTSource
        if getattr(fn, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource as source
        src = source(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                     attrs=attrs)
        try:
            options = {"num_warps": num_warps, "num_stages": num_stages}
            if maxnreg:
                options["maxnreg"] = maxnreg
            compiled = triton.compile(src, target=self.target, options=options)
            print(f"ok    {name:58s} {ptxas_report(compiled)}")
        except Exception as e:  # noqa: BLE001
            self.failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:1500]}")

    def finish(self):
        print(f"{self.failures} failures")
        raise SystemExit(1 if self.failures else 0)
