"""Build script. The package is pure Python today; the C++/CUDA extension (fusedres._C)
will be added here with torch.utils.cpp_extension. Until then, and on machines with no
compiler, `pip install .` installs the pure-Python package."""

from setuptools import setup

setup()
