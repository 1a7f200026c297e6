"""Build etap_torch._C: the CPU kernels always, the CUDA kernels when possible.

Environment switches (all optional):

    ETAP_CPU_ONLY=1        never build the CUDA kernels
    FORCE_CUDA=1           build the CUDA kernels without a visible GPU
                           (pick the architectures with TORCH_CUDA_ARCH_LIST)
    TORCH_CUDA_ARCH_LIST   forwarded to PyTorch's extension builder
    EIGEN_INCLUDE_DIR      where Eigen's headers are, if not found otherwise
    ETAP_DEBUG=1           -O0 -g

CUDA is built when torch is a CUDA build, nvcc is found, and either a GPU is
visible or FORCE_CUDA=1. The decision is printed.
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_eigen() -> str:
    candidates = []
    if os.environ.get("EIGEN_INCLUDE_DIR"):
        candidates.append(os.environ["EIGEN_INCLUDE_DIR"])
    purelib = sysconfig.get_paths()["purelib"]
    candidates.append(os.path.join(purelib, "cmeel.prefix", "include", "eigen3"))
    candidates += [os.path.join(p, "cmeel.prefix", "include", "eigen3") for p in sys.path if p]
    candidates += ["/usr/include/eigen3", "/usr/local/include/eigen3"]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "Eigen", "Dense")):
            return path
    raise RuntimeError(
        "Eigen headers were not found. Install them with `pip install cmeel-eigen` "
        "(or `apt-get install libeigen3-dev`), or point EIGEN_INCLUDE_DIR at the folder "
        "that contains `Eigen/Dense`."
    )


def _want_cuda() -> tuple[bool, str]:
    import torch

    if _flag("ETAP_CPU_ONLY"):
        return False, "ETAP_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, "no GPU is visible (set FORCE_CUDA=1 to build anyway)"


def _extensions():
    debug = _flag("ETAP_DEBUG")
    with_cuda, reason = _want_cuda()
    eigen = _find_eigen()

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_only = [s for s in cpp_sources if s.endswith("_cuda.cpp")]
    sources = [s for s in cpp_sources if s not in cuda_only]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-fdiagnostics-color=always"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    nvcc += ["--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "cuda"), eigen]

    if with_cuda:
        sources += cuda_only + sorted(glob.glob(os.path.join("cuda", "**", "*.cu"), recursive=True))
        define_macros.append(("ETAP_WITH_CUDA", None))
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "(detected from the visible GPU)")
        print(f"etap-torch: building CPU + CUDA kernels ({reason}); architectures: {arches}")
        extension = CUDAExtension
        compile_args = {"cxx": cxx, "nvcc": nvcc}
    else:
        print(f"etap-torch: building CPU kernels only ({reason})")
        extension = CppExtension
        compile_args = {"cxx": cxx}
    print(f"etap-torch: Eigen headers from {eigen}")

    return [
        extension(
            name="etap_torch._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="etap-torch",
    version="0.1.0",
    description="Task affinity and task grouping for multi-task learning, as a PyTorch extension",
    packages=find_packages(include=["etap_torch", "etap_torch.*"]),
    package_data={"etap_torch": ["data/**/*"]},
    include_package_data=True,
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15", "numpy", "tqdm", "matplotlib"],
)
