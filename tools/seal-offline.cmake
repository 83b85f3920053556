# Toolchain file used only while building Pyfhel's bundled Microsoft SEAL.
# SEAL's default build downloads GSL, zlib and zstd from the internet, which is
# not reachable here; none of them is needed (compression of serialized
# ciphertexts is off, and GSL only adds span types to SEAL's C++ API).
set(SEAL_BUILD_DEPS OFF CACHE BOOL "" FORCE)
set(SEAL_USE_MSGSL OFF CACHE BOOL "" FORCE)
set(SEAL_USE_ZLIB OFF CACHE BOOL "" FORCE)
set(SEAL_USE_ZSTD OFF CACHE BOOL "" FORCE)
