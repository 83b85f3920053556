"""Long calls in pieces: a comparison or truncation takes its dealer items before it starts.

Every comparison and truncation of a call opens its masked inputs in one round, with one DCF key per
element taken from the dealer's pool first (``compare._mask_open``): a call over n elements holds n
keys at once. With both parties in one process that was ~4.5 KB per element: GPT-2 base's 512-token
prefill truncated its 12 x 512 x 512 attention scores in one call and ran a 23 GB machine out of
memory. ``_mask_open`` therefore goes over inputs of more than ``MAX_ELEMENTS`` elements a flat piece
at a time (the same items in the same order, one opening round per piece), and a long prefill's
softmax goes in blocks of query rows (``twoparty.softmax_heads``, which also skips the keys no row of
a block may see). The cut depends on public shapes only, so both parties cut alike.
"""
from __future__ import annotations

import numpy as np

MAX_ELEMENTS = 1 << 18  # per piece: ~1.2 GB of both parties' DCF keys in one process


def rows_per_piece(row_elements: int) -> int:
    """Rows of ``row_elements`` elements each in one piece (at least one)."""
    return max(1, MAX_ELEMENTS // max(1, row_elements))


def flat_pieces(x: np.ndarray) -> list[np.ndarray]:
    """x flattened, in consecutive pieces of at most ``MAX_ELEMENTS`` (views)."""
    flat = np.asarray(x).reshape(-1)
    return [flat[a:a + MAX_ELEMENTS] for a in range(0, flat.size, MAX_ELEMENTS)]
