"""CryptoGen HE engine: BFV (SEAL via Pyfhel) over the shared field Z_t.

Server side (no secret key): PublicContext, ServerEngine, EncodedLinear, matmul_ct_pt_*,
EncryptedKVCache, qk_/pv_ decode/prefill, h2s_server, s2h_server, refresh.
Client side (secret key): ClientKeys, ClientRole. Layout helpers (LinearPlan, KVLayout,
query_slots, probs_slots, read_*) are public functions of shapes used by both parties;
KVShares (each party's own shares of the cached k, v) and local_* (the client's own attention terms).
See docs/HE.md.
"""
from .blocked import BlockPlan, block_plan, matmul_blocked, prefill_plan, prefill_steps
from .arcc import (local_pv, local_scores, probs_slots, pv_decode, pv_prefill, pv_span, qk_decode, qk_prefill,
                   query_slots, read_pv, read_scores)
from .convert import ClientRole, h2s_server, reconstruct, refresh, s2h_server
from .engine import Cipher, ServerEngine
from .errors import (CachePositionError, ConfigError, HEError, KeyMismatchError, NoiseBudgetError,
                     ParameterMismatchError, SecretKeyError, SerializationError, ShapeError, WrongKindError)
from .keys import ClientKeys, PublicContext
from .kvcache import EncryptedKVCache, KVLayout, KVShares
from .linear import (EncodedLinear, LinearPlan, matmul_ct_pt_decode, matmul_ct_pt_prefill, pad_rows,
                     plan_linear, shard_cols, shard_rows)
from .noise import NoiseModel
from .params import HEConfig
from .stats import HEStats


def required_rotation_steps(plans=()) -> set[int]:
    """Union of the Galois steps the given linear plans use, in decode and in batched prefill
    (client key gen; the ARCC kernels rotate nothing: their folds are done in the share domain)."""
    steps: set[int] = set()
    for p in plans:
        steps |= p.rotation_steps() | prefill_steps(p)
    return steps
