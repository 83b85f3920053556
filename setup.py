"""The compiled parts (everything else is in pyproject.toml): cryptogen/he/_ntt.c, the NTT-domain
kernels, cryptogen/he/_ctct.c, ct x ct, cryptogen/he/_wire.c, the wire's packing and modulus switch,
and cryptogen/mpc/_dcf.c, the DCF evaluation with AES-NI."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("cryptogen.he._ntt", ["cryptogen/he/_ntt.c"],
                             depends=["cryptogen/he/_modarith.h", "cryptogen/he/_ntt_rows.h"],
                             extra_compile_args=["-O3"]),
                   Extension("cryptogen.he._ctct", ["cryptogen/he/_ctct.c"], depends=["cryptogen/he/_modarith.h"],
                             extra_compile_args=["-O3"]),
                   Extension("cryptogen.he._wire", ["cryptogen/he/_wire.c"], depends=["cryptogen/he/_modarith.h"],
                             extra_compile_args=["-O3"]),
                   Extension("cryptogen.mpc._dcf", ["cryptogen/mpc/_dcf.c"], extra_compile_args=["-O3"])])
