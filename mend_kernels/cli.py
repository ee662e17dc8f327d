"""The ``mend-kernels`` command (also ``python -m mend_kernels``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

from . import __version__


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """Versions, backends (available or why not) and which backends each op implements."""
    import torch

    from . import _native
    from .ops import ALL_OPS, BACKENDS, backend_status
    from .ops._dispatch import triton_interpreter_enabled

    lines = [f"mend_kernels {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    lines += [f"{package} {_version(package)}" for package in ("torch", "triton", "transformers", "safetensors")]
    lines.append(f"torch threads {torch.get_num_threads()}, cuda available: {torch.cuda.is_available()}")
    lines.append("")
    lines.append("backends:")
    for name in BACKENDS:
        status = backend_status(name)
        lines.append(f"  {name:<18} {'yes' if status.available else 'no ':<4} {status.reason}")
    interpreter = "yes" if triton_interpreter_enabled() and _version("triton") != "not installed" else "no "
    lines.append(f"  {'triton-interpreter':<18} {interpreter:<4} set TRITON_INTERPRET=1 before triton is imported")
    for module_name in (_native.CPU_MODULE, _native.CUDA_MODULE):
        ok, _ = _native.status(module_name)
        if ok:
            lines.append(f"  {module_name}: {_native.load(module_name).build_info()}")
    lines.append("")
    lines.append("ops (implemented backends):")
    lines += [f"  {op.name:<18} {', '.join(op.backends)}" for op in ALL_OPS]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mend-kernels", description="Fast, memory-lean MEND model editing.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions and which backends are available, and why not")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
