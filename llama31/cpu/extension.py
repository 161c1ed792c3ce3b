"""Our C++ CPU kernels, compiled on first use (torch.utils.cpp_extension) and registered as torch ops.

Each kernel file is one torch library (``torch.ops.<name>``) with a ``supported()`` op that checks the CPU's
features at run time. The first ``load()`` compiles it (seconds; torch caches the build under
~/.cache/torch_extensions); a failed build is remembered, said once as a warning, and raised again at each later
``load()``. ``unsupported()`` says in a sentence why the kernels cannot run here, or None, so a caller can fall
back to what torch offers.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch


class CppKernels:
    def __init__(self, name: str, source: Path, fallback: str, needs: str, fakes: dict[str, Callable] | None = None):
        """name: the torch library the file defines; fallback: what runs instead if it cannot be built (for the
        warning); needs: the CPU features its supported() op checks (for unsupported()'s sentence); fakes: op name
        -> a function of the op's arguments returning an empty output of the right shape and dtype, which is what
        torch.compile traces the op with (compiled decoding calls it as it is)."""
        self.name, self.source, self.fallback, self.needs, self.fakes = name, source, fallback, needs, fakes or {}
        self.loaded = False
        self.failure: Exception | None = None
        self._why_not: str | None = None
        self._asked = False

    def unsupported(self) -> str | None:
        """None if the kernels run on this machine, else why not (a sentence for an error message); asked once."""
        if not self._asked:
            self._why_not, self._asked = self._find_why_not(), True
        return self._why_not

    def _find_why_not(self) -> str | None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"they are written for x86-64 CPUs, this is {platform.machine()}"
        try:
            self.load()
        except Exception as error:
            return f"they could not be built ({error}); set LLAMA31_VERBOSE_BUILD=1 to see the build"
        if not getattr(torch.ops, self.name).supported():
            return f"this CPU lacks {self.needs}"
        return None

    def load(self, verbose: bool = False) -> None:
        """Compile (first call) and load the kernels as torch.ops.<name>; a failed build is re-raised."""
        if self.loaded:
            return
        if self.failure is not None:
            raise self.failure
        try:
            from torch.utils.cpp_extension import load

            # -fopenmp: the kernels split rows over torch's threads (at::parallel_for), which is OpenMP in
            # torch's CPU builds; without it the pragma is ignored and one thread does all the work
            load(name=self.name, sources=[str(self.source)], extra_cflags=["-O3", "-fopenmp"],
                 extra_ldflags=["-fopenmp"], is_python_module=False,
                 verbose=verbose or bool(os.environ.get("LLAMA31_VERBOSE_BUILD")))
            for op, fake in self.fakes.items():
                torch.library.register_fake(f"{self.name}::{op}", fake)
            self.loaded = True
        except Exception as error:
            self.failure = error
            warnings.warn(f"llama31: the C++ kernels of {self.source.name} could not be built ({error}); "
                          f"{self.fallback}. Set LLAMA31_VERBOSE_BUILD=1 to see the build.")
            raise
