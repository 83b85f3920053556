"""The one compiled part: cryptogen/he/_ntt.c, the NTT-domain kernels (everything else is in pyproject.toml)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("cryptogen.he._ntt", ["cryptogen/he/_ntt.c"], extra_compile_args=["-O3"])])
