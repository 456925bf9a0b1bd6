"""The Node.js tooling the tests use (clients/node): its packages are installed
with `npm ci` from the committed package-lock.json the first time a test needs
them. Tests skip only when node or npm is not on the machine at all."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NODE_CLIENT = ROOT / "clients" / "node"
BUF = NODE_CLIENT / "node_modules" / ".bin" / "buf"


def node_modules() -> pathlib.Path:
    """clients/node/node_modules, installed if missing. An install that fails is a test failure."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: the Node client and buf need Node.js 18+ with npm")
    # npm writes this file last, so its presence means a finished install.
    if not (NODE_CLIENT / "node_modules" / ".package-lock.json").exists():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"npm ci failed in {NODE_CLIENT}:\n{done.stdout}\n{done.stderr}"
    return NODE_CLIENT / "node_modules"
