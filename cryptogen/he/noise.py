"""Static noise-budget model and lazy refresh (CryptoGen 2026 §noise refresh).

The server cannot measure a BFV noise budget (that needs the secret key), so every
server-side ciphertext carries a *static estimate* in bits, updated per operation by the
rules below. The client measures the true budget (``ClientKeys.noise_budget``); tests check
``estimate <= measured``.

Rules (b = budget in bits; lq = data-modulus bits, lt = log2 t, ln = log2 n):
  1. fresh encryption:   b0 = lq - lt - 8 - 2            (measured: 130 at lq=180, est 128)
  2. sum of ciphertexts: b  = -log2(sum 2^-b_i)          (worst case: noises add)
  3. ct x pt:            b' = b - (lt + ln/2 + 2)        (measured cost 47, est 50.5)
  4. ct x ct + relin:    b' = min(b1, b2) - (lt + ln/2 + 8)  (measured 54-55, est 56.5)
  5. rotation:           adds key-switch noise of budget b0 - 4: b' = add(b, b0 - 4)
  6. flooding (before anything leaves the server): b' = b - (sigma + ln + 1)   (see convert)
An operation "fits" if after it the ciphertext still has ``flood_cost + margin`` bits, so
that it can be re-randomised and sent to the client. If not, the caller refreshes first:
H2S then a fresh S2H through the client (:func:`cryptogen.he.convert.refresh`).
Rules 3-4 are the average-case (central-limit) behaviour SEAL shows for uniformly
random plaintexts; the proven worst case of rule 3 is lt + ln - 1.
Cost: arithmetic on floats only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import NoiseBudgetError


@dataclass(frozen=True)
class NoiseModel:
    config: "object"
    margin: float = 1.0

    @property
    def lt(self) -> float:
        return math.log2(self.config.t)

    @property
    def ln(self) -> float:
        return math.log2(self.config.n)

    @property
    def fresh(self) -> float:
        return self.config.data_modulus_bits - self.lt - 10.0

    @staticmethod
    def add(*budgets: float) -> float:
        return -math.log2(sum(2.0 ** (-b) for b in budgets))

    def after_ct_pt(self, b: float, terms: int = 1) -> float:
        """Budget of a sum of ``terms`` ct x pt products of inputs with budget ``b``."""
        return b - (self.lt + self.ln / 2 + 2) - math.log2(max(terms, 1))

    def after_ct_ct(self, b1: float, b2: float, terms: int = 1) -> float:
        return min(b1, b2) - (self.lt + self.ln / 2 + 8) - math.log2(max(terms, 1))

    def after_rotate(self, b: float) -> float:
        return self.add(b, self.fresh - 4)

    def after_fold(self, b: float, steps: int) -> float:
        """x <- x + rot(x) repeated ``steps`` times."""
        for _ in range(steps):
            b = self.add(b, self.after_rotate(b))
        return b

    def flood_cost(self, b: float | None = None) -> float:
        return self.config.flood_sigma + self.ln + 1

    def can_send(self, b: float) -> bool:
        """Whether a ciphertext with budget ``b`` can be flooded and still decrypt."""
        return b - self.flood_cost() >= self.margin

    def require_sendable(self, b: float, what: str) -> None:
        if not self.can_send(b):
            raise NoiseBudgetError(
                f"{what}: estimated budget {b:.1f} bits is below the {self.flood_cost() + self.margin:.0f} "
                f"bits needed to re-randomise it; refresh earlier")
