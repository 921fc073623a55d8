"""The native data path (csrc/net, C++17, no dependency beyond the C++ runtime) as the extension
p2pkv._native; everything else about the package is in pyproject.toml."""
from pathlib import Path

from setuptools import Extension, setup

NET = Path("csrc") / "net"

setup(ext_modules=[Extension(
    "p2pkv._native",
    sources=[str(p) for p in sorted(NET.glob("*.cpp")) if not p.name.startswith("fuzz")],
    include_dirs=[str(NET)],
    depends=[str(p) for p in NET.glob("*.h")],
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
    optional=True,
)])
