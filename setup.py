"""Packaging: the folders are the architecture (see README, "Layout").

engine/  -> stunet          config, info, cli; model/ (reference STUNet, policy, weights), backends/,
                            sampling/ (samplers, MultiDiffusion, runtime binding), pipeline/ (stages,
                            conditioning, text, video)
kernels/ -> stunet.kernels  Triton kernels with their reference math
export/  -> stunet.export   ONNX export (one export spec per network)
engine/demo/                the shipped demo cascade (weights as package data, trained by tools/train_demo.py)
csrc/    -> stunet._C       C++ denoising runtime (pybind11); CPU always, CUDA only with STUNET_CUDA=1

Build switches (environment, read only here):
  STUNET_CUDA=1          also compile csrc/*.cu with nvcc and link cudart (nvcc must be on PATH or in
                         CUDA_HOME); unset or 0 builds the CPU runtime, whatever the machine has.
  STUNET_CUDA_ARCH=80;90 compute capabilities to build for (default 80;90, plus PTX of the lowest for newer GPUs).
"""
import os
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -g0 overrides the -g that Python's own build flags may carry: a 1.4 MB extension instead of 13 MB of debug info.
CXX_FLAGS = ["-std=c++17", "-O3", "-g0", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden"]
CPU_SOURCES = ["csrc/schedule.cpp", "csrc/multidiffusion.cpp", "csrc/runtime_cpu.cpp", "csrc/bindings.cpp"]
CUDA_SOURCES = ["csrc/runtime_cuda.cu"]


def cuda_requested() -> bool:
    flag = os.environ.get("STUNET_CUDA", "0").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"STUNET_CUDA must be 0 or 1, got {flag!r}")
    return flag == "1"


def find_nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc") or "")
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise RuntimeError("STUNET_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME "
                       "(or build without STUNET_CUDA for the CPU runtime)")


def find_cuda_home(nvcc: str) -> str:
    """The toolkit whose lib64 holds cudart: CUDA_HOME, nvcc's own install (it reports _HERE_=<toolkit>/bin,
    also when PATH holds a wrapper script), or /usr/local/cuda."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
    here = [line.split("=", 1)[1].strip() for line in dry.splitlines() if line.startswith("#$ _HERE_=")]
    dirs = [os.environ.get("CUDA_HOME", ""), *(os.path.dirname(h) for h in here), "/usr/local/cuda"]
    for d in dirs:
        if d and os.path.exists(os.path.join(d, "lib64", "libcudart.so")):
            return d
    raise RuntimeError(f"STUNET_CUDA=1 but libcudart.so was not found under {[d for d in dirs if d]}; set CUDA_HOME")


class BuildExt(build_ext):
    """Adds pybind11's headers, and with STUNET_CUDA=1 compiles the .cu sources with nvcc and links cudart."""

    def build_extensions(self):
        import pybind11

        for ext in self.extensions:
            ext.include_dirs += [pybind11.get_include(), "csrc"]
            if cuda_requested():
                self._add_cuda(ext)
        super().build_extensions()

    def _add_cuda(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        cuda_home = find_cuda_home(nvcc)
        listed = os.environ.get("STUNET_CUDA_ARCH", "80;90").replace(",", ";").split(";")
        archs = [a.strip() for a in listed if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[0]},code=compute_{archs[0]}")
        os.makedirs(self.build_temp, exist_ok=True)
        for src in CUDA_SOURCES:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-std=c++17", "-O3", "--fmad=false", "-DSTUNET_WITH_CUDA",
                   "-Icsrc", "-Xcompiler", "-fPIC", *gencode]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            ext.extra_objects.append(obj)
        ext.define_macros.append(("STUNET_WITH_CUDA", "1"))
        ext.library_dirs.append(os.path.join(cuda_home, "lib64"))
        ext.runtime_library_dirs.append(os.path.join(cuda_home, "lib64"))
        ext.libraries.append("cudart")


X86 = "platform_machine == 'x86_64' or platform_machine == 'AMD64'"  # the TensorRT-RTX wheels' platforms

setup(
    name="stunet",
    version="0.1.0",
    description="FP16 inference engine for Space-Time U-Net (STUNet) video diffusion models",
    python_requires=">=3.10",
    packages=["stunet", "stunet.model", "stunet.backends", "stunet.sampling", "stunet.pipeline", "stunet.kernels",
              "stunet.export", "stunet.demo"],
    package_dir={
        "stunet": "engine",
        "stunet.kernels": "kernels",
        "stunet.export": "export",
    },
    package_data={"stunet": ["py.typed"],  # PEP 561: type checkers read the package's annotations
                  "stunet.demo": ["weights/*/*.json", "weights/*/*.safetensors", "weights/*.json"]},
    install_requires=[
        "torch>=2.11",  # the oldest release the suite is run on
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "video": ["av>=12", "pillow"],
        "text": ["transformers>=4.40"],
        "diffusers": ["diffusers>=0.30", "transformers>=4.40"],
        "triton": ["triton>=3.2"],
        "export": ["onnx>=1.17", "onnxscript>=0.6.2", "onnxruntime>=1.18"],
        "tensorrt-rtx": [f"tensorrt-rtx-cu13-{part}>=1.7; {X86}" for part in ("bindings", "libs")] + ["onnx>=1.16"],
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "av>=12", "pillow", "transformers>=4.40",
                 "triton>=3.2", "onnx>=1.17", "onnxscript>=0.6.2", "onnxruntime>=1.18", "diffusers>=0.30"]
                + [f"tensorrt-rtx-cu13-{part}>=1.7; {X86}" for part in ("bindings", "libs")],
    },
    ext_modules=[Extension("stunet._C", CPU_SOURCES, depends=["csrc/runtime.h", "csrc/step_math.h"],
                           extra_compile_args=CXX_FLAGS, language="c++")],
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["stunet = stunet.cli:run"]},
)
