"""Security tests: what each party can learn (tests/security/README in the module docstrings).

``sec_helpers`` (statistics) lives here; ``mpc_helpers`` is shared with tests/mpc and ``tiny`` with
tests/ (the same sys.path approach as tests/mpc/conftest.py: pytest puts a conftest's folder on
the path; the other two folders are added explicitly)."""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent / "mpc", _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
