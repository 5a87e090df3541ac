"""Helpers for `make test-latest` and `make lock` (stdlib only; run with the venv's python).

python tools/newest_set.py names          glmtune's direct requirements (base + dev), names only
python tools/newest_set.py freeze OUT     the venv's exact set as a constraints file, atomically
python tools/newest_set.py diff A B       the packages whose versions differ between two sets
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date
from importlib.metadata import requires
from pathlib import Path


def names() -> list[str]:
    """Direct requirements of the installed glmtune that CI installs (no extra, or the dev extra)."""
    out = []
    for req in requires("glmtune") or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        marker = req.split(";", 1)[1] if ";" in req else ""
        if (not marker or "'dev'" in marker or '"dev"' in marker) and name not in out:
            out.append(name)
    return out


def read_set(path: str | Path) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def freeze(out: str, header: str) -> None:
    lines = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    # Local build tags (torch's "+cpu") would not match a CUDA build of the same release.
    pins = [re.sub(r"\+[A-Za-z0-9.]+$", "", line) for line in lines if "==" in line]
    text = f"# {header} (Python {sys.version_info.major}.{sys.version_info.minor}, {date.today()})\n"
    text += "\n".join(pins) + "\n"
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def diff(a: str, b: str) -> list[str]:
    old, new = read_set(a), read_set(b)
    return [
        f"{name}: {old.get(name, '-')} -> {new.get(name, '-')}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "names":
        print(" ".join(names()))
    elif cmd == "freeze":
        freeze(rest[0], rest[1] if len(rest) > 1 else "the exact set the suite passed with")
    elif cmd == "diff":
        changes = diff(*rest)
        print("\n".join(changes) if changes else "no version differs")
    else:
        sys.exit(__doc__)
