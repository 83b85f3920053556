"""Exception types of the 2PC engine.

Messages name shapes, roles, provider names and public parameters only; they never
contain a share, an opened value or any input (DESIGN §5: nothing secret in errors).
"""


class MPCError(Exception):
    """Base class of every error raised by ``cryptogen.mpc``."""


class ShapeError(MPCError, ValueError):
    """Operand shapes do not match, or a received message has an unexpected shape."""


class RoleError(MPCError, ValueError):
    """Unknown role, or both parties claim the same role."""


class ProviderError(MPCError, ValueError):
    """The two parties use different correlated-randomness providers, or a pool is inconsistent."""


class RangeError(MPCError, ValueError):
    """A public parameter (scale, bit count, range bound) is outside what a protocol supports."""


class ChannelError(MPCError, RuntimeError):
    """The peer closed the channel, failed, or did not answer in time."""


class FieldValueError(MPCError, ValueError):
    """A share is not an int64 array of elements of Z_t."""


class ConfigError(MPCError, ValueError):
    """A setting (environment variable) names something this build cannot do."""
