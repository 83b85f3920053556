"""Worst-case noise bounds and noise flooding (CryptoGen 2026 §noise; issue #14).

Construction: the server cannot measure a BFV noise budget (that needs the secret key), so
every server-side ciphertext carries a *proven lower bound* b on its invariant noise budget,
updated per operation by the rules below; ``ServerEngine.export`` floods the noise from that
bound before anything leaves the server. Who learns what: parameters and bounds are public.
Cost: float arithmetic only.

Notation. v = invariant noise (t/q)(c0 + c1 s) - m mod t, nu >= ||v||_inf, budget
b = -log2(2 nu) (SEAL's definition; decryption is correct iff b > 0). q = product of the L data
primes, P = special prime, q_max = largest data prime, lt = log2 t, ln = log2 n.
Constants: B_e = 21 bounds every SEAL error coefficient (centered binomial sampler, |e| <= 21;
the clipped-normal build: <= 19); s, u ternary, so ||s||_1 <= n. Assumption: the client runs
key generation and encryption honestly (semi-honest model); all rules are then deterministic
worst cases -- no tail probability is used anywhere (delta = 0 in the total below).

Derivation (each rule is an upper bound on nu, i.e. a lower bound on b):
  1. fresh (SEAL: encrypt at level qP, divide-and-round by P, add round(q m / t)):
     raw noise <= (2n+1) B_e / P + 1/2 + n/2 + 1/2  =>  nu0 = (t/q)(n/2 + 1 + (2n+1) B_e / P).
  1b. the export's Enc_pk(0) (``ServerEngine._enc_zero``: at the data level, no division by P):
     (pk0 u + e0) + (pk1 u + e1) s = e0 + e1 s - e_pk u with u, s ternary, |e| <= B_e:
     raw noise <= (2n+1) B_e  =>  nu_z = (t/q)((2n+1) B_e + 1) (SEAL's key-level Enc(0), the
     fallback without the kernel, is below it: rule 1).
  2. sums: nu(x + y) <= nu(x) + nu(y) (triangle); plaintext add (rounded scaling) adds t/(2q).
  3. ct x pt: SEAL lifts plaintext coefficients to |p| <= (t-1)/2, and v' = v p exactly, so
     nu' <= n (t-1)/2 nu: cost log2(n (t-1)/2) = lt + ln - 1 bits (the proven worst case).
  4. key switch (rotation, relinearisation; Galois maps permute coefficients with signs, so
     ||sigma(v)|| = ||v||): sum_j [c]_{q_j} e_j / P plus rounding by P adds
     nu_ks = (t/q)(L n q_max B_e / P + (n+1)/2).
  5. ct x ct (tensor, scale by t/q, round; BEHZ): with a_i = (t/q)(c0 + c1 s) = m_i + v_i + t k_i,
     ||k_i|| <= n + 2 (ciphertext words in [0, q)), ||m_i|| <= t/2, rounding error <= L + 1/2 per
     tensor word times (1, s, s^2):  nu' <= t n (n + 5/2)(nu1 + nu2) + n nu1 nu2
     + (t/q)(L + 1/2)(1 + n + n^2) + nu_ks (relinearisation).
  6. flooding (export): add Enc_pk(0) (noise nu_z, rule 1b) and F to c0, F = floor(Y) - 3A/2 with
     Y = U1 + U2 + U3, U_i uniform on [0, A), A = 2^a. floor(Y) = K1 + K2 + K3 + J with K_i uniform
     in [0, A) and J in {0,1,2} w.p. 1/6, 2/3, 1/6: sampled exactly from AES-256-CTR keyed by
     32 fresh bytes of os.urandom (a CSPRNG: engine._random_bytes).
  7. privacy of one coefficient: the raw noise e (|e| <= E = (q/t) nu) is an integer, so
     floor(Y) + e = floor(Y + e) and by data processing H^2(F, F + e) <= H^2(Y, Y + e)
     <= e^2 I / 8 (Cauchy-Schwarz on sqrt of the density), I = Fisher information of Y
     = 2 sqrt(3) ln(2 + sqrt 3) / A^2 = 4.562 / A^2 (Irwin-Hall of order 3).
  8. transcript: for a key, at most 2^X exports (X = ``max_exports_log2``) of n coefficients each;
     Bhattacharyya coefficients multiply (also adaptively: each conditional step is bounded by
     the sup over histories), so H^2 <= m E^2 I / 8 with m = 2^X n, and
     TV <= sqrt(2 H^2) = (E / A) sqrt(m I / 4) = (E / A) 2^((X + ln)/2) * 1.068.
     a = ceil(sigma + (X + ln)/2 + log2 1.068 + log2 E) gives TV <= 2^-sigma for the whole
     per-key transcript (sigma = ``flood_sigma`` >= 40); per ciphertext TV <= 2^-(sigma + X/2).
  9. after flooding nu <= nu + nu0 + (t/q)(1.5 A + 1): at n = 16384, X = 20, sigma = 40 this
     costs ~58.7 bits (uniform flooding with a union bound would cost sigma + X + ln + 1 = 75).
An operation "fits" if afterwards the ciphertext can still be flooded with ``margin`` bits left;
if not, the caller refreshes first (H2S then a fresh S2H through the client, ``convert.refresh``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import NoiseBudgetError

B_ERR = 21                                         # |e| bound of SEAL's error sampler
IH3_FISHER = 2 * math.sqrt(3) * math.log(2 + math.sqrt(3))  # Fisher information of Irwin-Hall(3)
TV_CONST = math.log2(math.sqrt(IH3_FISHER) / 2)    # log2 1.068 (step 8)


def nu_of(b: float) -> float:
    return 2.0 ** (-b - 1)


def bits_of(nu: float) -> float:
    return -math.log2(2 * nu)


@dataclass(frozen=True)
class NoiseModel:
    """Worst-case budget rules for ``config``; ``qi`` = all coefficient-modulus primes (data primes,
    then the special prime) of the loaded context (default: the primes SEAL picks for the config)."""

    config: "object"
    qi: tuple[int, ...] | None = None
    margin: float = 1.0
    _c: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        qi = tuple(int(q) for q in (self.qi or self.config.expected_qi))
        object.__setattr__(self, "qi", qi)
        n, t, data, P = self.config.n, self.config.t, qi[:-1], qi[-1]
        lq = sum(math.log2(q) for q in data)
        self._c.update(n=n, t=t, L=len(data), P=P, qmax=max(data), lq=lq, t_over_q=2.0 ** (math.log2(t) - lq))

    # ---- constants ----------------------------------------------------------------
    @property
    def lt(self) -> float:
        return math.log2(self.config.t)

    @property
    def ln(self) -> float:
        return math.log2(self.config.n)

    @property
    def lq(self) -> float:
        return self._c["lq"]

    @property
    def fresh_encryption(self) -> float:
        """Rule 1: a fresh public-key encryption (a bound for the client's seeded symmetric uploads too: their noise is e alone)."""
        c = self._c
        return bits_of(c["t_over_q"] * (c["n"] / 2 + 1 + (2 * c["n"] + 1) * B_ERR / c["P"]))

    @property
    def enc_zero(self) -> float:
        """Rule 1b: the export's Enc_pk(0) at the data level (ServerEngine._enc_zero, no division by the
        special prime): e0 + e1 s - e u with u, s ternary, |e| <= B_e: raw noise <= (2n+1) B_e."""
        c = self._c
        return bits_of(c["t_over_q"] * ((2 * c["n"] + 1) * B_ERR + 1))

    @property
    def fresh(self) -> float:
        """Rule 1 + one plaintext add: what S2H and ``convert.refresh`` hand back (x_c + x_s)."""
        return self.after_add_plain(self.fresh_encryption)

    @property
    def key_switch(self) -> float:
        """Rule 4: budget of the noise one key switch adds."""
        c = self._c
        return bits_of(c["t_over_q"] * (c["L"] * c["n"] * (c["qmax"] - 1) * B_ERR / c["P"] + (c["n"] + 1) / 2))

    @property
    def plain_add(self) -> float:
        """Rule 2: budget of the rounding noise a plaintext addition adds."""
        return self.lq - self.lt

    # ---- rules ------------------------------------------------------------------
    @staticmethod
    def add(*budgets: float) -> float:
        return -math.log2(sum(2.0 ** (-b) for b in budgets))

    def after_add_plain(self, b: float) -> float:
        return self.add(b, self.plain_add)

    def ct_pt_cost(self) -> float:
        return math.log2(self.config.n * (self.config.t - 1) / 2)

    def after_ct_pt(self, b: float, terms: int = 1) -> float:
        """Rule 3 (+ rule 2): a sum of ``terms`` ct x pt products of inputs with budget ``b``."""
        return b - self.ct_pt_cost() - math.log2(max(terms, 1))

    def after_ct_ct(self, b1: float, b2: float, terms: int = 1) -> float:
        """Rule 5 (+ rule 2 over ``terms`` products)."""
        c, n1, n2 = self._c, nu_of(b1), nu_of(b2)
        n, t, L = c["n"], c["t"], c["L"]
        nu = (t * n * (n + 2.5) * (n1 + n2) + n * n1 * n2 + c["t_over_q"] * (L + 0.5) * (1 + n + n * n)
              + nu_of(self.key_switch))
        return bits_of(nu) - math.log2(max(terms, 1))

    def after_rotate(self, b: float) -> float:
        return self.add(b, self.key_switch)

    def after_fold(self, b: float, steps: int) -> float:
        """x <- x + rot(x) repeated ``steps`` times."""
        for _ in range(steps):
            b = self.add(b, self.after_rotate(b))
        return b

    # ---- flooding (rules 6-9) ----------------------------------------------------
    def flood_exponent(self, b: float) -> int:
        """a with A = 2^a (rule 8) for a ciphertext of budget ``b`` (before Enc(0) is added)."""
        cfg = self.config
        log_e = math.log2((nu_of(b) + nu_of(self.enc_zero)) / self._c["t_over_q"])
        return int(math.ceil(cfg.flood_sigma + (cfg.max_exports_log2 + self.ln) / 2 + TV_CONST + log_e))

    def after_flood(self, b: float) -> float:
        a = self.flood_exponent(b)
        return bits_of(nu_of(b) + nu_of(self.enc_zero) + self._c["t_over_q"] * (1.5 * 2.0 ** a + 1))

    def flood_cost(self, b: float | None = None) -> float:
        """Bits of budget flooding costs (for ``b``; default: a ciphertext with 60 bits)."""
        b = 60.0 if b is None else b
        return b - self.after_flood(b)

    def per_ciphertext_tv_log2(self) -> float:
        """log2 of the statistical distance of one flooded ciphertext (rule 8 with m = n)."""
        return -(self.config.flood_sigma + self.config.max_exports_log2 / 2)

    def can_send(self, b: float) -> bool:
        """Whether a ciphertext with budget ``b`` can be flooded and still decrypt."""
        return self.after_flood(b) >= self.margin

    def require_sendable(self, b: float, what: str) -> None:
        if not self.can_send(b):
            raise NoiseBudgetError(
                f"{what}: proven budget {b:.1f} bits is below the {self.flood_cost(b) + self.margin:.0f} "
                f"bits needed to re-randomise it; refresh earlier")
