"""How much correlated randomness a request will consume, so the dealer-free provider can make
it *before* the request (offline) instead of inside it (online).

What a step consumes depends only on public sizes: per worker link and kind (Beaver triples,
solved bits), it is linear in the features of the step (tokens start .. start+T-1):

    demand = a + b*T + c*T*(start+T) + d*R      (R: rows of the final LayerNorm: 0, 1 or T)

(truncations, GELU and LayerNorm are per element of (T, width) matrices; softmax runs on the
(heads, T, start+T) score matrix; the final LayerNorm on the rows whose logits are asked for).
The client observes its own consumption after every step and fits the four coefficients per
(link, kind) by least squares; profiles persist per model shape (public facts only) in the
user's cache folder, and the shipped models' profiles ship in ``configs/demand``. Without a
profile the first request runs with on-demand production (slower online) and calibrates.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

KINDS = ("triple", "bits")
MARGIN = 1.02  # a little extra: a short pool costs an online wait, extra items only offline time
SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "demand"


def _features(start: int, T: int, logits) -> list[float]:
    rows = 0 if logits is None else (T if logits == "all" else 1)
    return [1.0, float(T), float(T * (start + T)), float(rows)]


def profile_key(cfg, plan_workers: int, layer_groups: int, he_config, reveal: str = "logits") -> str:
    """A name for the model's public shape, worker split, HE parameters and output (token-only
    output adds the 2PC argmax to every generation step: its own profile)."""
    shape = json.dumps([cfg.to_hf(), plan_workers, layer_groups, he_config.to_dict()], sort_keys=True)
    key = hashlib.sha256(shape.encode()).hexdigest()[:20]
    return key if reveal == "logits" else f"{key}-{reveal}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cryptogen" / "demand"


class DemandModel:
    def __init__(self, key: str, folder: Path | None = None):
        self.key = key
        self.path = (folder or cache_dir()) / f"{key}.json"
        self.obs: dict[str, list] = {}  # "worker/kind" -> [[features..., count], ...]
        for path in (SHIPPED / f"{key}.json", self.path):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for k, rows in data.get("observations", {}).items():
                seen = {tuple(r) for r in self.obs.get(k, [])}
                self.obs.setdefault(k, []).extend(r for r in rows if tuple(r) not in seen)

    def observe(self, worker: int, start: int, T: int, logits, consumed: dict) -> None:
        f = _features(start, T, logits)
        for kind in KINDS:
            rows = self.obs.setdefault(f"{worker}/{kind}", [])
            row = f + [float(consumed.get(kind, 0))]
            if row not in rows:
                rows.append(row)
                del rows[:-64]  # keep the latest

    def predict(self, worker: int, steps: list[tuple]) -> dict | None:
        """Items of each kind the steps (start, T, logits) will take on this link; None if the
        observations do not determine the coefficients yet."""
        out = {}
        for kind in KINDS:
            rows = self.obs.get(f"{worker}/{kind}", [])
            if len(rows) < 4:
                return None
            A = np.array([r[:4] for r in rows])
            y = np.array([r[4] for r in rows])
            X = np.array([_features(*s) for s in steps])
            # a feature constant over the observations folds into the intercept, which is right only
            # if the steps asked about have that same value
            used = [0] + [j for j in range(1, 4) if A[:, j].std() > 0]
            if any(not np.all(X[:, j] == A[0, j]) for j in range(1, 4) if j not in used):
                return None
            if np.linalg.matrix_rank(A[:, used]) < len(used):
                return None
            coef, *_ = np.linalg.lstsq(A[:, used], y, rcond=None)
            out[kind] = int(np.ceil(max(0.0, float((X[:, used] @ coef).sum())) * MARGIN))
        return out

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"key": self.key, "observations": self.obs}))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only costs the next run its calibration
