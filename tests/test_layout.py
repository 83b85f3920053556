"""The trust boundary in the code: what runs on the user's machine imports nothing of the
server's (and no Ray), what runs on the server's cluster imports nothing of the client's, and
the shared package imports neither. Checked on the import statements (ast), and by importing the
client with Ray made unimportable."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_SIDE = ("cryptogen.server", "cryptogen.workers", "cryptogen.cluster", "cryptogen.scheduler.ray_runner",
               "cryptogen.scheduler.inprocess", "cryptogen.dealer", "ray")
CLIENT_SIDE = ("cryptogen.client",)
# The CLI and bench front ends start either side (lazily, inside commands): not part of either domain.
FRONT_ENDS = {"cli.py", "secure_cli.py", "bench.py", "bench_ray.py"}


def _imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _hits(folder: str, package: str, banned: tuple, skip=()) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name in skip:
            continue
        sub = ".".join(path.relative_to(ROOT / folder).parent.parts)
        pkg = package + (f".{sub}" if sub else "")
        for mod in _imports(path, pkg):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


def test_client_imports_nothing_of_the_server():
    assert _hits("client", "cryptogen.client", SERVER_SIDE) == []


@pytest.mark.parametrize("folder", ["server", "workers", "scheduler", "cluster", "dealer"])
def test_server_side_imports_nothing_of_the_client(folder):
    # scheduler/inprocess.py runs both parties as threads of one process (tests and the in-process
    # bench, like SPU's simulate): it belongs to neither domain
    assert _hits(folder, f"cryptogen.{folder}", CLIENT_SIDE, skip={"inprocess.py"}) == []


def test_shared_package_imports_neither_side():
    assert _hits("cryptogen", "cryptogen", SERVER_SIDE + CLIENT_SIDE, skip=FRONT_ENDS) == []


def test_client_runs_with_ray_unimportable():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import cryptogen.client.remote, cryptogen.client.local_server, cryptogen.secure_cli\n"
            "assert sys.modules['ray'] is None\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
