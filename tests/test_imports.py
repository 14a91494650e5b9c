"""The package's entry modules import first, on their own: no import cycle hides behind
the order in which the other tests happen to import them."""

from __future__ import annotations

import subprocess
import sys

# the packages whose modules import each other (io <-> compiler, peft -> both)
MODULES = [
    "adaptc.io",
    "adaptc.compiler.hotswap",
    "adaptc.compiler.combine",
    "adaptc.peft.hotswap",
    "adaptc.layers",
    "adaptc.plan",
]


def test_each_module_imports_in_a_fresh_interpreter():
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in MODULES
    }
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed, failed
