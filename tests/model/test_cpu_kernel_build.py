"""Install-time kernel builds: needs-a-build detection, the run-time notice, and `python -m ...cpu_kernels`.

A tiny extension (Python.h only, compiled in about a second) stands in for the real kernels, built
through the same KernelBuild in a per-test TORCH_EXTENSIONS_DIR, so nothing here waits a minute.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pagoda.model import cpu_kernels
from pagoda.model.cpu_kernels import KernelBuild, load_announced, load_cpu_kernels, main

# The module's init function follows TORCH_EXTENSION_NAME, which torch sets per build (name_v1 included).
_TINY_CPP = """
#include <Python.h>
#include "tiny.h"
#define PAGODA_CAT2(a, b) a##b
#define PAGODA_CAT(a, b) PAGODA_CAT2(a, b)
#define PAGODA_STR2(a) #a
#define PAGODA_STR(a) PAGODA_STR2(a)
static PyModuleDef tiny_module = {PyModuleDef_HEAD_INIT, PAGODA_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC PAGODA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&tiny_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "answer", TINY_ANSWER);
  return module;
}
"""


@pytest.fixture
def tiny_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], KernelBuild]:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))

    def make(source: str = _TINY_CPP) -> KernelBuild:
        src = tmp_path / "csrc"
        src.mkdir(exist_ok=True)
        (src / "tiny.cpp").write_text(source)
        (src / "tiny.h").write_text("#define TINY_ANSWER 42\n")
        # Unique per test: torch keeps a process-wide version per extension name.
        name = f"pagoda_test_ext_{uuid.uuid4().hex[:8]}"
        return KernelBuild(name=name, sources=(src / "tiny.cpp",), include_dir=src)

    return make


def test_a_first_build_is_announced_and_a_cached_one_is_silent(
    tiny_build: Callable[..., KernelBuild], capsys: pytest.CaptureFixture[str]
) -> None:
    build = tiny_build()
    assert not build.is_built()
    assert load_announced(build).answer == 42
    err = capsys.readouterr().err
    assert "Compiling Pagoda's C++ CPU kernels" in err and "python -m pagoda.model.cpu_kernels" in err
    assert f"cached in {build.build_directory()}" in err
    assert build.is_built()
    assert load_announced(build).answer == 42
    assert capsys.readouterr().err == ""


def _change_flags(build: KernelBuild, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    return dataclasses.replace(build, cflags=(*build.cflags, "-DTINY_EXTRA=1"))


def _upgrade_torch(build: KernelBuild, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".next")
    return build


def _edit_header(build: KernelBuild, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    header = build.include_dir / "tiny.h"
    header.write_text("#define TINY_ANSWER 43\n")
    # Past any coarse filesystem mtime granularity, as an editor's save a moment later would be.
    later = header.stat().st_mtime + 5
    os.utime(header, (later, later))
    return build


def _delete_library(build: KernelBuild, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    (build.build_directory() / f"{build.name}.so").unlink()
    return build


def _lose_stamp(build: KernelBuild, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    (build.build_directory() / cpu_kernels._STAMP).unlink()
    return build


@pytest.mark.parametrize("change", [_change_flags, _upgrade_torch, _edit_header, _delete_library, _lose_stamp])
def test_any_changed_input_needs_a_build(
    change: Callable[[KernelBuild, pytest.MonkeyPatch], KernelBuild],
    tiny_build: Callable[..., KernelBuild],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build = tiny_build()
    build.load(verbose=False)
    assert build.is_built()
    assert not change(build, monkeypatch).is_built()


def test_main_builds_with_visible_progress_then_is_a_no_op(
    tiny_build: Callable[..., KernelBuild], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    build = tiny_build()
    monkeypatch.setattr(cpu_kernels, "_KERNELS", build)
    assert main() == 0
    out = capfd.readouterr().out
    # ninja's own numbered steps reach the terminal (fd 1), which is what a person watches move.
    assert "Building Pagoda's C++ CPU kernels" in out and "[2/2]" in out
    assert "built in" in out and str(build.build_directory()) in out
    assert main() == 0
    assert "already built" in capfd.readouterr().out


def test_main_fails_with_a_clear_message_when_the_build_fails(
    tiny_build: Callable[..., KernelBuild], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cpu_kernels, "_KERNELS", tiny_build("this is not C++;\n"))
    assert main() == 1
    err = capfd.readouterr().err
    assert "building Pagoda's C++ CPU kernels failed" in err and "pure-torch" in err


def test_the_real_kernels_are_built_after_load_and_the_install_step_is_then_a_no_op() -> None:
    if load_cpu_kernels() is None:
        pytest.skip("C++ kernels not built (no compiler, or disabled)")
    assert cpu_kernels._KERNELS.is_built()
    done = subprocess.run([sys.executable, "-m", "pagoda.model.cpu_kernels"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "already built" in done.stdout


def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_one(
    tiny_build: Callable[..., KernelBuild], monkeypatch: pytest.MonkeyPatch
) -> None:
    build = tiny_build()
    build.build_directory().mkdir(parents=True, exist_ok=True)
    (build.build_directory() / cpu_kernels._TORCH_BATON).touch()  # what a build killed mid-compile leaves

    def wait_forever(self: object) -> None:
        raise AssertionError("the build waited on a lock file that no running build holds")

    monkeypatch.setattr("torch.utils.file_baton.FileBaton.wait", wait_forever)
    assert build.load(verbose=False).answer == 42
    assert not (build.build_directory() / cpu_kernels._TORCH_BATON).exists()


def test_a_second_builder_says_it_waits_and_then_loads_the_same_build(
    tiny_build: Callable[..., KernelBuild], capsys: pytest.CaptureFixture[str]
) -> None:
    build = tiny_build()
    build.build_directory().mkdir(parents=True, exist_ok=True)
    loaded: list[object] = []
    with open(build.build_directory() / cpu_kernels._FLOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another builder, as far as `load` can tell
        waiter = threading.Thread(target=lambda: loaded.append(build.load(verbose=False)))
        waiter.start()
        deadline = time.monotonic() + 30
        err = ""
        while "Waiting for another process" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert "Waiting for another process building Pagoda's C++ CPU kernels" in err
        assert not loaded
    waiter.join(timeout=120)
    assert not waiter.is_alive() and loaded[0].answer == 42


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None, reason="x86-64 with a C++ compiler")
def test_the_kernels_compile_for_a_cpu_without_avx512(tmp_path: Path) -> None:
    """Every kernel source, for an AVX2 CPU (x86-64-v3: most laptops): its scalar and AVX2 paths must compile,
    else the whole extension fails there and every layer falls back to torch. One translation unit of all the
    sources, checked for syntax only (~20 s; the build of this machine's own kernels is -march=native)."""
    from torch.utils.cpp_extension import include_paths

    csrc = Path(cpu_kernels.__file__).resolve().parent.parent / "csrc"
    unity = tmp_path / "all_kernels.cpp"
    unity.write_text("".join(f'#include "{csrc / name}"\n' for name in cpu_kernels._SOURCES))
    command = ["c++", "-fsyntax-only", "-std=c++20", "-march=x86-64-v3", "-fopenmp",
               "-DTORCH_EXTENSION_NAME=pagoda_portability", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{csrc}",
               *(f"-isystem{path}" for path in include_paths()), f"-isystem{sysconfig.get_paths()['include']}",
               str(unity)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
