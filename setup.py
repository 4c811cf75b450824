"""Build script: the pure-Python package plus, when it can be built, the C++/CUDA extension
fusedres._C (csrc/).

* The extension needs torch importable at build time (install torch first, then
  `pip install --no-build-isolation -e .`) and a C++ compiler. Without either, the
  package installs without it and runs on the triton and torch backends.
* CUDA sources (csrc/cuda/*.cu) are compiled when a CUDA toolkit is found: the first of
  $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the folder above the nvcc on PATH whose lib
  (or lib64) folder holds libcudart. FUSEDRES_BUILD_CUDA=0 skips them, =1 requires them.
* TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it and without a visible GPU
  the default is "8.0;9.0" (A100, H100/H200).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _log(message: str) -> None:
    print(f"fusedres setup: {message}", file=sys.stderr)


def _has_cudart(root: str) -> bool:
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib", "lib64")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: the folder whose lib holds libcudart (not always the folder
    of the nvcc on PATH, which may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and _has_cudart(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _build_cuda_setting() -> bool | None:
    value = os.environ.get("FUSEDRES_BUILD_CUDA", "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"fusedres setup: FUSEDRES_BUILD_CUDA must be 0 or 1, got {value!r}")
    return value == "1"


def get_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass); both empty when the extension cannot be built here."""
    want_cuda = _build_cuda_setting()
    if os.environ.get("FUSEDRES_BUILD_EXT", "1") == "0":
        _log("FUSEDRES_BUILD_EXT=0: building without the fusedres._C extension")
        return [], {}
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        _log("no C++ compiler found: building without the fusedres._C extension (triton and torch backends only)")
        return [], {}
    cuda_home = find_cuda_home() if want_cuda is not False else None
    if want_cuda and cuda_home is None:
        raise SystemExit("fusedres setup: FUSEDRES_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to the "
                         "folder whose lib holds libcudart)")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time (pip's isolated build?): building without the fusedres._C "
             "extension; install torch, then `pip install --no-build-isolation -e .` to build it")
        return [], {}

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx_flags = ["-O3"]
    extension = cpp_extension.CppExtension
    extra_compile_args: dict[str, list[str]] = {"cxx": cxx_flags}
    if cuda_home:
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        extension = cpp_extension.CUDAExtension
        extra_compile_args["nvcc"] = ["-O3"]  # no fast math: denormals and exact division as in PyTorch
        _log(f"building fusedres._C with CUDA kernels (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
    else:
        _log("building fusedres._C with CPU kernels only (no CUDA toolkit found, or FUSEDRES_BUILD_CUDA=0)")
    ext = extension("fusedres._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                    extra_compile_args=extra_compile_args, py_limited_api=True)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = get_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
