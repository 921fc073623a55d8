"""The native data paths, everything else about the package is in pyproject.toml:
- p2pkv._native (csrc/net, C++17, nothing beyond the C++ runtime): tcp's send/receive/serve loops;
- p2pkv._c10d (csrc/c10d with csrc/net's frame and geometry code, a torch C++ extension linking
  c10d): the nccl backend's gloo data path;
- p2pkv/csrc in a wheel: the CUDA kernels' sources, which p2pkv.kernels compiles on first use on a GPU
  machine (an editable install reads them from csrc/ at the root). It needs torch at build time, so it is built only where
  setup.py can import torch: `pip install --no-build-isolation -e .` with torch installed first
  (pip's default build isolation hides the installed torch). Without it, the nccl backend says so."""
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
NET = Path("csrc") / "net"
C10D = Path("csrc") / "c10d"
FLAGS = ["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]

ext_modules = [Extension(
    "p2pkv._native",
    sources=[str(p) for p in sorted(NET.glob("*.cpp")) if not p.name.startswith("fuzz") and p.name != "module.cpp"]
    + [str(NET / "module.cpp")],
    include_dirs=[str(HERE / NET)],  # absolute: ninja compiles from the build folder
    depends=[str(p) for p in NET.glob("*.h")],
    language="c++",
    extra_compile_args=FLAGS,
    libraries=["dl"],  # crypto.cpp opens libcrypto at run time
    optional=True,
)]
CUDA_SOURCES = ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "csrc/net/cuda_api.h"]


class _BuildPy(build_py):
    """Also copies the CUDA kernels' sources (CUDA_SOURCES) into the built package as p2pkv/csrc."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for pattern in CUDA_SOURCES:
            for src in sorted(HERE.glob(pattern)):
                rel = src.relative_to(HERE)
                dst = Path(self.build_lib) / "p2pkv" / rel
                self.mkpath(str(dst.parent))
                self.copy_file(str(src), str(dst))


cmdclass = {"build_py": _BuildPy}

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("p2pkv: torch is not importable here, so p2pkv._c10d (the nccl backend's native data path) is not "
          "built; install torch first, then `pip install --no-build-isolation -e .`", file=sys.stderr)
else:
    ext_modules.append(CppExtension(
        "p2pkv._c10d",
        sources=[str(C10D / "pair.cpp"), str(C10D / "module.cpp")]
        + [str(NET / n) for n in ("frame.cpp", "geometry.cpp", "io.cpp", "link.cpp", "cuda_staging.cpp", "threads.cpp")],
        include_dirs=[str(HERE / NET), str(HERE / C10D)],
        depends=[str(p) for p in (*NET.glob("*.h"), *C10D.glob("*.h"))],
        extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall"],  # torch picks the C++ standard
        optional=True,
    ))

    class _Build(BuildExtension):
        """torch's build_ext, but an optional extension that fails to compile (ninja raises
        RuntimeError, which setuptools' `optional` does not catch) is skipped with a message."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except RuntimeError as e:
                if not ext.optional:
                    raise
                print(f"p2pkv: skipped the optional extension {ext.name}: {e}", file=sys.stderr)

    cmdclass["build_ext"] = _Build

setup(ext_modules=ext_modules, cmdclass=cmdclass)
