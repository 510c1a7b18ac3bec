"""Making a fresh machine ready: Debian's nginx and wrk, and the Python packages the servers need."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import CpuPlan

REPO = Path(__file__).resolve().parent.parent
PY_MODULES = ("fastapi", "uvicorn", "aiohttp", "uvloop", "httptools", "orjson")
PY_PACKAGES = ("fastapi", "uvicorn[standard]", "aiohttp", "orjson")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def _have(binary: str) -> bool:
    return bool(shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin"))


def ensure_system_tools() -> None:
    """apt-get install nginx and wrk when they are missing (needs root and Debian/Ubuntu)."""
    missing = [pkg for pkg in ("nginx", "wrk") if not _have(pkg)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"bench: missing {', '.join(missing)}; install them (apt-get install {' '.join(missing)})")
    print(f"bench: installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # keep the package's own nginx service from starting on port 80 while it installs
    added_policy = not POLICY_RC.exists()
    if added_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, check=True)
    finally:
        if added_policy:
            POLICY_RC.unlink(missing_ok=True)


def gateway_command() -> str | None:
    """The ``admiral-optimizer`` script beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "admiral-optimizer"
    return str(beside) if beside.exists() else shutil.which("admiral-optimizer")


def measuring_setup(binary: str, package: str, prefix: str) -> tuple[CpuPlan, Path]:
    """For a tool that measures under ``binary``: stop if it is missing, install nginx and wrk, and give the CPU plan and a work directory."""
    if shutil.which(binary) is None:
        sys.exit(f"bench: {binary} is not installed (apt-get install {package})")
    ensure_system_tools()
    return CpuPlan.detect(), Path(tempfile.mkdtemp(prefix=prefix))


def tree_command(workdir: Path, tree: Path, name: str) -> str:
    """A command that runs the gateway from the checkout ``tree`` (on ``PYTHONPATH``), to measure versions side by side.

    The path is written into the script, not read from the environment when the server starts:
    servers built one after another and started later each keep their own tree. ``-P`` keeps the
    current directory off ``sys.path``: run from a checkout, ``-c`` would import that one instead.
    """
    script = workdir / f"gateway-from-{name}"
    script.write_text(f'#!/bin/sh\nexec env PYTHONPATH="{tree.resolve()}" {sys.executable} -P -c "import sys; from app.cli import main; sys.exit(main())" "$@"\n')
    script.chmod(0o755)
    return str(script)


def ensure_python(install_gateway: bool) -> None:
    """Install the servers' packages (and the gateway, editable) into this interpreter's venv.

    Outside a virtualenv the bench makes ``bench/.venv`` and re-runs itself with it, so a fresh
    machine needs nothing but ``python3``.
    """
    missing = [m for m in PY_MODULES if importlib.util.find_spec(m) is None]
    need_gateway = install_gateway and gateway_command() is None
    if not missing and not need_gateway:
        return
    if sys.prefix == sys.base_prefix:
        _reexec_in_venv()
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if missing:
        print(f"bench: installing {', '.join(missing)} with pip", flush=True)
        subprocess.run([*pip, *PY_PACKAGES], check=True)
    if need_gateway:
        print(f"bench: installing the gateway from {REPO} with pip", flush=True)
        subprocess.run([*pip, "-e", str(REPO)], check=True)


def _reexec_in_venv() -> None:
    venv = REPO / "bench" / ".venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"bench: creating {venv}", flush=True)
        if subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False).returncode != 0:
            if os.geteuid() == 0 and shutil.which("apt-get"):
                subprocess.run(["apt-get", "update", "-qq"], check=True)
                subprocess.run(["apt-get", "install", "-y", "-qq", "python3-venv"], check=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    os.execv(str(python), [str(python), *sys.argv])
