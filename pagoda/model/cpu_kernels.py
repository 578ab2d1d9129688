"""Builds (once; torch caches the build) and loads Pagoda's C++ CPU kernels.

`python -m pagoda.model.cpu_kernels` builds them at install time (scripts/setup.sh runs it), so that the
first engine start does not spend a silent minute in the compiler. Should a build still be needed at run
time (sources, flags or torch changed since), `load_cpu_kernels` says so on stderr before compiling.

Returns None when they cannot be built (no compiler or ninja) or are disabled with
PAGODA_DISABLE_CPU_KERNELS=1; every caller keeps a pure-torch path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ["module.cpp", "paged_decode.cpp", "linear_rowwise.cpp", "argmax.cpp", "sample.cpp", "elementwise.cpp",
            "token_bitmask.cpp", "panel_linear.cpp", "gguf_linear.cpp", "int4_linear.cpp", "decode_layers.cpp"]
# Records which inputs generated the build.ninja next to it (see KernelBuild.is_built).
_STAMP = "pagoda_build_inputs.sha256"
# Held with flock around torch's build: the kernel releases it when its holder dies, which torch's own lock
# file (a "lock" file that exists while a build runs) cannot do.
_FLOCK = "pagoda_build.flock"
_TORCH_BATON = "lock"


@dataclass(frozen=True)
class KernelBuild:
    """One torch JIT C++ extension: its inputs, and whether torch's cached build is current for them."""

    name: str
    sources: tuple[Path, ...]
    include_dir: Path
    # -march=native makes the build machine-specific; each machine builds its own at install.
    cflags: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp")
    ldflags: tuple[str, ...] = ("-fopenmp",)

    def build_directory(self) -> Path:
        # torch's own helper, so that the answer follows TORCH_EXTENSIONS_DIR exactly as `load` does.
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(self.name, verbose=False))

    def inputs_digest(self) -> str:
        # What torch writes into build.ninja; ninja cannot see a change here in a build.ninja not yet rewritten.
        import torch

        parts = [torch.__version__, sys.version, *map(str, self.sources), str(self.include_dir),
                 *self.cflags, "--", *self.ldflags]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def is_built(self) -> bool:
        """True when loading will not compile: same inputs as the last build, and ninja has no work.

        The stamp catches changed flags, source paths or torch/Python versions (torch rewrites build.ninja
        only inside `load`); ninja's dry run then applies ninja's own rule to every file it tracks (sources,
        headers through depfiles, the .so itself), so an edited header or a deleted .so counts too.
        """
        build_dir = self.build_directory()
        stamp = build_dir / _STAMP
        if not stamp.is_file() or stamp.read_text().strip() != self.inputs_digest():
            return False
        try:
            dry_run = subprocess.run(["ninja", "-n"], cwd=build_dir, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):  # no ninja: `load` cannot build either
            return False
        return dry_run.returncode == 0 and "no work to do" in dry_run.stdout

    def load(self, verbose: bool) -> ModuleType:
        """Builds if needed (verbose: ninja's progress lines on stdout), then imports the extension.

        A build killed part-way (Ctrl-C at the wrong moment, a timeout, a machine stopped) leaves torch's lock
        file behind, and every later `load` would wait on it forever; under our flock no other builder can be
        running, so such a file is stale and is removed.
        """
        from torch.utils.cpp_extension import load

        build_dir = self.build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / _FLOCK, "a") as flock_file:
            try:
                fcntl.flock(flock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"Waiting for another process building Pagoda's C++ CPU kernels in {build_dir}...",
                      file=sys.stderr, flush=True)
                fcntl.flock(flock_file, fcntl.LOCK_EX)
            stale_baton = build_dir / _TORCH_BATON
            if stale_baton.exists():
                logger.warning("removing %s, left by a kernel build that was stopped part-way", stale_baton)
                stale_baton.unlink(missing_ok=True)
            module = load(
                name=self.name,
                sources=[str(s) for s in self.sources],
                extra_cflags=list(self.cflags),
                extra_ldflags=list(self.ldflags),
                extra_include_paths=[str(self.include_dir)],
                verbose=verbose,
            )
            # Replaced atomically: another engine process may be reading it in is_built right now.
            stamp = build_dir / _STAMP
            partial = stamp.with_name(f"{_STAMP}.{os.getpid()}")
            partial.write_text(self.inputs_digest() + "\n")
            partial.replace(stamp)
        return module


_KERNELS = KernelBuild(name="pagoda_cpu_ops", sources=tuple(_CSRC / s for s in _SOURCES), include_dir=_CSRC)


def load_announced(build: KernelBuild) -> ModuleType:
    """Loads `build`, telling stderr before and after when that means compiling (a silent minute looks hung)."""
    if build.is_built():
        return build.load(verbose=False)
    print(f"Compiling Pagoda's C++ CPU kernels ({build.name}): no build yet for these sources and this torch "
          "(1-2 minutes on 2 cores, once; `python -m pagoda.model.cpu_kernels` does it at install time)...",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    module = build.load(verbose=False)
    print(f"Compiled Pagoda's C++ CPU kernels in {time.monotonic() - start:.0f} s "
          f"(cached in {build.build_directory()}).", file=sys.stderr, flush=True)
    return module


@lru_cache(maxsize=1)
def load_cpu_kernels() -> ModuleType | None:
    if os.environ.get("PAGODA_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        return load_announced(_KERNELS)
    except Exception as exc:  # no compiler / ninja: the pure-torch paths still work
        logger.warning("Pagoda CPU kernels unavailable (%s); using slower torch paths", exc)
        return None


def main() -> int:
    """Builds the kernels now, with ninja's progress lines, so that no engine start has to."""
    if os.environ.get("PAGODA_DISABLE_CPU_KERNELS") == "1":
        print("Pagoda's C++ CPU kernels are disabled (PAGODA_DISABLE_CPU_KERNELS=1); nothing to build.")
        return 0
    build = _KERNELS
    already = build.is_built()
    if not already:
        print("Building Pagoda's C++ CPU kernels (once per machine, 1-2 minutes on 2 cores)...", flush=True)
    start = time.monotonic()
    try:
        build.load(verbose=not already)
    except Exception as exc:
        print(f"error: building Pagoda's C++ CPU kernels failed: {exc}\n"
              "Pagoda still runs, on slower pure-torch paths; a C++ compiler (g++) and ninja are needed "
              "for the kernels.", file=sys.stderr)
        return 1
    state = "already built" if already else f"built in {time.monotonic() - start:.0f} s"
    print(f"Pagoda's C++ CPU kernels: {state}, in {build.build_directory()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
