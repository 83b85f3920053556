"""CryptoGen on Ray: secure transformer generation with an encrypted KV cache.

Shared code (both parties import it): ``field`` (Z_t and fixed point), ``model`` (plaintext
reference GPT-2), ``he`` (Pyfhel kernels), ``mpc`` (2PC protocols). Party code lives in the
top-level folders ``client/``, ``workers/``, ``scheduler/``, ``cluster/``, installed as
``cryptogen.client`` and so on.
"""
__version__ = "0.1.0"
