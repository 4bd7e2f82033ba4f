"""rwkvx_kernels: the RWKV-X ops, each a subpackage with a plain-PyTorch reference beside its Triton kernels.

    rwkvx_kernels.wkv7(r, w, k, v, a, b, ...)            # RWKV-7 state recurrence (`wkv7/`)
    rwkvx_kernels.sparse_attention(q, k, v, cs, topk)    # MoBA top-k chunk attention (`sparse_attention/`)

Each subpackage is also callable as its entry point, so both the op and its submodules
(`rwkvx_kernels.wkv7.naive`, ...) keep one name.
"""

import sys
import types


class _CallableOpPackage(types.ModuleType):
    """A subpackage that calls its entry point function of the same name when called."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = _CallableOpPackage


from . import sparse_attention, wkv7  # noqa: E402

_make_callable(wkv7.__name__)
_make_callable(sparse_attention.__name__)

__all__ = ["wkv7", "sparse_attention"]
