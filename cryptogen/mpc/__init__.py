"""2PC engine: additive shares over Z_t (the HE plaintext field), semi-honest client/server.

See docs/MPC.md. Every protocol is ``proto(party, *shares, **public_params)``, called by both
parties with their own ``Party``; ``simulate`` runs both roles in two threads.
"""
from .approx import exp_neg, reciprocal, rsqrt, rsqrt_normalized
from .arith import (add_sp, input_client, input_server, matmul_ss, mul_many, mul_sp, mul_ss, open_,
                    public, square_ss)
from .channel import Channel, ChannelStats, InMemoryChannel, channel_pair
from .compare import drelu, ge_const, gt_public, relu, select, trunc
from .errors import (ChannelError, FieldValueError, MPCError, ProviderError, RangeError, RoleError,
                     ShapeError)
from .gelu import gelu, gelu_ref
from .layernorm import layernorm, layernorm_ref
from .party import Party, reconstruct, share, simulate
from .provider import Dealer, DealerProvider, DealerService, ServiceDealerProvider, Source
from .provider_he import HEProvider
from .softmax import causal_mask, max_last, softmax

__all__ = [n for n in dir() if not n.startswith("_")]
