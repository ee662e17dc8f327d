"""Build of mend-kernels: metadata lives in pyproject.toml; this file only builds the native modules.

The extension modules mend_kernels._C (CPU) and mend_kernels._C_cuda (CUDA) are built by CMake
(CMakeLists.txt) with the Ninja generator. torch is not needed to build.

Environment variables:
  MEND_KERNELS_BUILD_NATIVE  auto (default): build; if CMake or the compiler fails, warn and install
                             the pure-Python package. 0: skip the native build. 1: a failure fails.
  MEND_KERNELS_CUDA          auto (default): build _C_cuda when nvcc is found (CUDACXX, CUDA_HOME /
                             CUDA_PATH, or PATH); if only the CUDA part fails, warn and keep _C.
                             0: never. 1: required (a failure fails the install).
  MEND_KERNELS_BUILD_TYPE    CMake build type, default Release.
  CMAKE_ARGS                 extra arguments for the CMake configure step (e.g. -DCMAKE_CUDA_ARCHITECTURES=90).
  CMAKE_BUILD_PARALLEL_LEVEL parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CPU_EXT = "mend_kernels._C"
CUDA_EXT = "mend_kernels._C_cuda"


def _mode(name: str) -> str:
    """'auto', '0' or '1' from an environment variable (accepts on/off/true/false/yes/no)."""
    raw = os.environ.get(name, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "on", "true", "yes", "force"):
        return "1"
    if raw in ("0", "off", "false", "no", "skip"):
        return "0"
    raise SystemExit(f"{name} must be 'auto', '0' or '1', got {raw!r}")


def _find_nvcc() -> str | None:
    """nvcc from CUDACXX, CUDA_HOME / CUDA_PATH, or PATH; None if absent."""
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(Path(os.environ["CUDACXX"]))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _tool(module: str, attr: str, exe: str) -> str | None:
    """A build tool (cmake / ninja): from its pip package, else this interpreter's scripts folder
    (so that an un-activated venv still uses its own tools), else PATH."""
    candidates = []
    try:
        candidates.append(Path(getattr(__import__(module), attr)) / exe)
    except Exception:  # noqa: BLE001 - any failure just means "not from the package"
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / exe)
    candidates.append(Path(sys.executable).parent / exe)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(exe)


def _warn(message: str) -> None:
    text = f"\n{'!' * 78}\nmend-kernels: WARNING: {message}\n{'!' * 78}\n"
    print(text, file=sys.stderr, flush=True)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _in_tree_path(ext_name: str) -> Path:
    """Where an editable install keeps the module: next to the package's sources."""
    return ROOT / (ext_name.replace(".", os.sep) + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _remove(path: Path) -> None:
    if path.is_file():
        print(f"mend-kernels: removing stale {path}", flush=True)
        path.unlink()


class NativeBuildError(RuntimeError):
    pass


class CMakeExtension(Extension):
    """An extension module produced by a target of CMakeLists.txt."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])
        self.target = name.rsplit(".", 1)[-1]


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once, then place each module where setuptools expects it."""

    def build_extensions(self) -> None:
        native_mode = _mode("MEND_KERNELS_BUILD_NATIVE")
        cuda_mode = _mode("MEND_KERNELS_CUDA")
        want_cuda = any(ext.name == CUDA_EXT for ext in self.extensions)
        nvcc = _find_nvcc() if want_cuda else None
        if want_cuda and nvcc is None:
            if cuda_mode == "1":
                raise NativeBuildError("MEND_KERNELS_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
            want_cuda = False

        attempts = [True, False] if (want_cuda and cuda_mode == "auto") else [want_cuda]
        built: set[str] = set()
        for index, with_cuda in enumerate(attempts):
            try:
                self._cmake_build(with_cuda, nvcc)
                built = {CPU_EXT, CUDA_EXT} if with_cuda else {CPU_EXT}
                break
            except (NativeBuildError, subprocess.CalledProcessError, OSError) as exc:
                last = index == len(attempts) - 1
                # CUDA required and it failed, or nothing native could be built and it is required.
                if (with_cuda and cuda_mode == "1") or (last and native_mode == "1"):
                    raise
                if not last:
                    _warn(f"building the CUDA extension failed ({exc}); retrying without CUDA")
                else:
                    _warn(
                        f"building the native extensions failed ({exc}); installing the pure-Python "
                        "package (the 'cpu' and 'cuda' backends will be unavailable). Set "
                        "MEND_KERNELS_BUILD_NATIVE=1 to make this an error, or =0 to skip the build."
                    )
        for name in (CPU_EXT, CUDA_EXT):
            if name not in built:
                # Never ship or import a module left over from an earlier build.
                _remove(Path(self.get_ext_fullpath(name)))
                if self.inplace or getattr(self, "editable_mode", False):
                    _remove(_in_tree_path(name))
        self.extensions = [ext for ext in self.extensions if ext.name in built]

    def _cmake_build(self, with_cuda: bool, nvcc: str | None) -> None:
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        if cmake is None:
            raise NativeBuildError("cmake not found (pip install cmake)")
        if ninja is None:
            raise NativeBuildError("ninja not found (pip install ninja)")
        try:
            import pybind11
        except ImportError as exc:
            raise NativeBuildError("pybind11 is not installed in the build environment") from exc

        build_type = os.environ.get("MEND_KERNELS_BUILD_TYPE", "Release")
        settings = [
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMEND_KERNELS_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda and nvcc:
            settings.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        settings += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        # A persistent tree under build/ so that rebuilds are incremental (editable installs would
        # otherwise get a fresh temporary build_temp each time), keyed by every configure setting so
        # that no cached value (e.g. from an old CMAKE_ARGS) can leak into a different configuration.
        env = [f"{var}={os.environ.get(var, '')}" for var in ("CC", "CXX", "CXXFLAGS", "CUDAHOSTCXX", "CUDAFLAGS", "LDFLAGS")]
        key = hashlib.sha256("\0".join([cmake, *settings, *env]).encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{'cuda' if with_cuda else 'cpu'}-{key}"
        out_dir = build_dir / "modules"
        build_dir.mkdir(parents=True, exist_ok=True)
        settings.insert(0, f"-DMEND_KERNELS_OUTPUT_DIR={out_dir}")
        args = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *settings]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        targets = ["_C", "_C_cuda"] if with_cuda else ["_C"]

        print(f"mend-kernels: configuring ({'CPU + CUDA' if with_cuda else 'CPU only'}): {shlex.join(args)}", flush=True)
        subprocess.run(args, check=True, cwd=ROOT)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--parallel", jobs, "--target", *targets], check=True, cwd=ROOT
        )

        for ext in self.extensions:
            if ext.name == CUDA_EXT and not with_cuda:
                continue
            produced = sorted(p for p in out_dir.glob(f"{ext.target}.*") if p.suffix in (".so", ".pyd", ".dylib"))
            if not produced:
                raise NativeBuildError(f"CMake did not produce {ext.target} in {out_dir}")
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(produced[-1], dest)
            shutil.copymode(produced[-1], dest)
            print(f"mend-kernels: {ext.name} -> {dest}", flush=True)


class BuildPy(build_py):
    """build_py that, for an editable install with MEND_KERNELS_BUILD_NATIVE=0, removes native modules
    an earlier editable build left in the source tree (they would still be imported)."""

    def run(self) -> None:
        super().run()
        if _mode("MEND_KERNELS_BUILD_NATIVE") == "0" and getattr(self, "editable_mode", False):
            for name in (CPU_EXT, CUDA_EXT):
                _remove(_in_tree_path(name))


def _extensions() -> list[CMakeExtension]:
    if _mode("MEND_KERNELS_BUILD_NATIVE") == "0":
        return []
    exts = [CMakeExtension(CPU_EXT)]
    if _mode("MEND_KERNELS_CUDA") != "0":
        exts.append(CMakeExtension(CUDA_EXT))
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
