"""Builds seqkernels._C: csrc/registration.cpp, csrc/python.cpp and csrc/cpu/*.cpp always; csrc/cuda/*.cu only for a CUDA build.

Environment:
  SEQKERNELS_CPU_ARCH   value for -march (default: native, since the extension is built where it runs;
                        set e.g. x86-64-v3 to build for other machines)
  SEQKERNELS_NO_EXT=1   install the pure-Python package only (the cpu backend then reports itself unavailable)
  MAX_JOBS              parallel compile jobs for ninja (torch's cpp_extension)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("SEQKERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/registration.cpp", "csrc/python.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT)) + sorted(
        glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)
    )
    arch = os.environ.get("SEQKERNELS_CPU_ARCH", "native")
    # -Wno-psabi: without AVX-512 (x86-64-v3, say), GCC notes that 64-byte vector arguments change the calling
    # convention; the functions taking them are inline, within one file, so no call crosses that boundary.
    cxx_flags = ["-O3", "-std=c++17", f"-march={arch}", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-Wall",
                 "-Wno-unused-function", "-Wno-psabi"]
    build_cuda = torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources
    if build_cuda:
        ext = CUDAExtension(
            "seqkernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DSEQKERNELS_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("seqkernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["seqkernels", "seqkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
