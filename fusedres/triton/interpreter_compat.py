"""Make older Triton interpreters work with NumPy >= 2.4.

Under TRITON_INTERPRET=1 every scalar kernel argument is a one-element NumPy array, and a
loop over a scalar bound (`for i in range(0, n)`) converts it with `int(array)`. NumPy 2.4
turned that conversion of a 1-d array into an error ("only 0-dimensional arrays can be
converted to Python scalars"); Triton 3.7 and later squeeze the array first, Triton 3.6
(the GPU machine's release) does not. `apply()` teaches such an interpreter to squeeze.
It changes nothing for compiled kernels, and nothing on a Triton that already works.
"""

from __future__ import annotations

import operator


def _index_broken(interpreter, tl) -> bool:
    """Whether the interpreter's tensor.__index__ fails on a one-element scalar tensor."""
    import numpy as np

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(tl.tensor, scope)
        scalar = tl.tensor(interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        return operator.index(scalar) != 3
    except TypeError:
        return True
    finally:
        scope.restore()


def apply() -> bool:
    """Patch the interpreter if it needs it; True when a patch was installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fusedres_squeeze", False) or not _index_broken(interpreter, tl):
        return False

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._fusedres_squeeze = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
