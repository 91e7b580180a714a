"""Import every module of the named installed packages (run from outside the source tree).

A runtime module that imports a package only the test extras install, or a module missing
from the built distribution, fails here with the module's name.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(packages: list[str]) -> int:
    failures: list[str] = []
    count = 0
    for name in packages:
        package = importlib.import_module(name)
        origin = Path(package.__file__ or "").resolve()
        if Path.cwd().resolve() in origin.parents:
            print(f"{name} was imported from the current folder ({origin}), not the install")
            return 1
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if info.name == "migrations.env" or info.name.startswith("migrations.versions."):
                continue  # Alembic's environment and revision scripts run inside Alembic
            count += 1
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # every failure is reported, then the walk fails
                failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    for failure in failures:
        print(f"cannot import {failure}")
    print(f"imported {count} modules of {', '.join(packages)}: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
