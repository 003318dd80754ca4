"""Build script for the rpc_py._C extension.

One extension module: the C files in csrc/*/ (CPython C API + NumPy C API) and, when CUDA is built,
the .cu files compiled by nvcc and linked with the static CUDA runtime, so the shared object needs
no library path at run time.

Environment switches:
  RPC_PY_CUDA=auto|0|1   auto (default): build CUDA when nvcc is found; 1: require it; 0: CPU only
  RPC_PY_CUDA_ARCHS      compute capabilities to build SASS for, e.g. "80;90" (default "auto": 8.0,
                         9.0, 10.0 and the oldest member of the newest family this nvcc knows, 12.0
                         for nvcc 13.0), each kept only if this nvcc supports it; PTX is added for the
                         lowest and the highest of them (JIT on GPUs without matching SASS)
  RPC_PY_WERROR=1        warnings are errors (gcc -Wall -Wextra -Werror, nvcc -Werror all-warnings)
  RPC_PY_SANITIZE=1      AddressSanitizer + UBSan on the C code (compile and link)
  RPC_PY_GLIBC=2.28      link against that glibc version instead of the build machine's (the
                         manylinux wheel, see ci/build_wheel.sh): gcc and nvcc still compile, but the
                         link runs `zig cc -target <arch>-linux-gnu.2.28` (zig from the `ziglang`
                         package or $ZIG), whose glibc stubs bind every libc/libm/libpthread/libdl/
                         librt symbol, ours and libcudart_static's, to a version that glibc has.
                         OpenMP links to RPC_PY_LIBGOMP (a libgomp.so.1 built for an old glibc, which
                         the repair step bundles; default: gcc's own)
  CUDA_HOME / CUDA_PATH  toolkit root (default: the directory above the real nvcc)
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root:
            return root
    # nvcc may be a wrapper script or a symlink: prefer the directory that holds the headers.
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode("utf-8", "replace").split():
                if word.endswith("/bin/nvcc") and os.path.isfile(word):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    except OSError:
        pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return candidates[0]


def _cuda_libdir(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    return os.path.join(home, "lib64")


def _nvcc_archs(nvcc):
    """Compute capabilities (as ints, 80 = sm_80) this nvcc can emit SASS for."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted({int(m) for m in re.findall(r"\bsm_(\d+)\b", out)})


def _cuda_archs(nvcc):
    """The compute capabilities to build: RPC_PY_CUDA_ARCHS, or the default set (see the top)."""
    supported = _nvcc_archs(nvcc)
    wanted = os.environ.get("RPC_PY_CUDA_ARCHS", "auto").strip().lower()
    if wanted == "auto":
        if not supported:  # an nvcc too old for --list-gpu-code: the two the kernels were written for
            return [80, 90]
        newest_family = max(a // 10 for a in supported)
        newest = min(a for a in supported if a // 10 == newest_family)
        picks = sorted({a for a in (80, 90, 100, newest) if a in supported})
        if not picks:
            sys.exit(f"rpc_py: this nvcc supports none of sm_80/90/100 (it lists {supported})")
        return picks
    try:
        picks = sorted({int(a) for a in re.split(r"[;, ]+", wanted) if a})
    except ValueError:
        sys.exit(f"RPC_PY_CUDA_ARCHS: expected numbers like '80;90', got {wanted!r}")
    if not picks or min(picks) < 80:
        sys.exit(f"RPC_PY_CUDA_ARCHS: the kernels need compute capability >= 8.0, got {wanted!r}")
    unsupported = [a for a in picks if supported and a not in supported]
    if unsupported:
        sys.exit(f"RPC_PY_CUDA_ARCHS: this nvcc cannot build sm_{unsupported} (it lists {supported})")
    return picks


def _gcc_file(name):
    """Absolute path of a library as the C compiler finds it (gcc -print-file-name)."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    try:
        path = subprocess.run(cc + [f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        path = ""
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"RPC_PY_GLIBC: the C compiler ({cc[0]}) does not know where {name} is")
    return os.path.realpath(path)


def _find_zig():
    zig = os.environ.get("ZIG")
    if zig:
        return [zig]
    try:
        import ziglang
    except ImportError:
        sys.exit("RPC_PY_GLIBC needs zig as the linker: pip install ziglang (or set ZIG=/path/to/zig)")
    return [os.path.join(os.path.dirname(ziglang.__file__), "zig")]


def _compiler_accepts(flags):
    """True when the C compiler builds and links a file with these flags (used for OpenMP)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run(cc + flags + [src, "-o", os.path.join(d, "t")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return r.returncode == 0


CUDA_MODE = os.environ.get("RPC_PY_CUDA", "auto").strip().lower()
if CUDA_MODE not in ("auto", "0", "1"):
    sys.exit(f"RPC_PY_CUDA must be auto, 0 or 1, got {CUDA_MODE!r}")
WERROR = _env_flag("RPC_PY_WERROR")
SANITIZE = _env_flag("RPC_PY_SANITIZE")
GLIBC = os.environ.get("RPC_PY_GLIBC", "").strip()
if GLIBC and not re.fullmatch(r"2\.\d+", GLIBC):
    sys.exit(f"RPC_PY_GLIBC must look like 2.28, got {GLIBC!r}")
if GLIBC and SANITIZE:
    sys.exit("RPC_PY_GLIBC and RPC_PY_SANITIZE do not combine (the sanitizer runtimes are the build machine's)")

NVCC = None
if CUDA_MODE != "0":
    NVCC = _find_nvcc()
    if NVCC is None:
        if CUDA_MODE == "1":
            sys.exit("RPC_PY_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        print("rpc_py: nvcc not found, building the CPU backend only (RPC_PY_CUDA=auto)")
WITH_CUDA = NVCC is not None
CUDA_HOME = _cuda_home(NVCC) if WITH_CUDA else None

# csrc/kernels: pure C/CUDA (no Python); csrc/runtime: the CUDA runtime shim (or its CPU-only stand-in);
# csrc/python: the module, its types and the bindings. Headers are found by name in all three.
CSRC_LAYERS = ("kernels", "runtime", "python")
c_sources = sorted(glob.glob(os.path.join("csrc", "*", "*.c")))
cu_sources = sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
if WITH_CUDA:
    sources = [s for s in c_sources if os.path.basename(s) != "cuda_stub.c"] + cu_sources
else:
    sources = c_sources
depends = sorted(glob.glob(os.path.join("csrc", "*", "*.h")) + glob.glob(os.path.join("csrc", "*", "*.cuh")))

cflags = ["-O3", "-std=c11", "-fvisibility=hidden"]
ldflags = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_21_API_VERSION")]
if WERROR:
    cflags += ["-Wall", "-Wextra", "-Werror"]
# libm: exp/sqrt/... must bind to a versioned libm, not to whatever the interpreter happens to load.
libraries = ["m"]
if _compiler_accepts(["-fopenmp"]):
    cflags.append("-fopenmp")
    macros.append(("RPC_PY_WITH_OPENMP", "1"))
    if GLIBC:  # zig's -fopenmp means LLVM's runtime; gcc's objects call GNU libgomp
        ldflags.append(os.path.realpath(os.environ.get("RPC_PY_LIBGOMP") or _gcc_file("libgomp.so")))
    else:
        ldflags.append("-fopenmp")
if GLIBC:
    # gcc's static runtime ahead of zig's compiler-rt, so helpers resolve as in a gcc link:
    # __builtin_cpu_supports (the AVX2/AVX-512 dispatch of compress_cpu.c) reads gcc's __cpu_model,
    # and with compiler-rt's copy every fast path was reported unsupported; compiler-rt also carried
    # its own exp/expf/sqrt instead of libm's (ci/check_wheel.py and tests/test_build_features.py
    # check both).
    ldflags.append(_gcc_file("libgcc.a"))
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    # -fno-wrapv undoes the -fwrapv of CPython's own flags, which would hide signed overflow from UBSan.
    cflags += san + ["-g", "-fno-wrapv"]
    ldflags += san

library_dirs = []
include_dirs = [os.path.join(HERE, "csrc", layer) for layer in CSRC_LAYERS] + [numpy.get_include()]
nvcc_flags = []
if WITH_CUDA:
    macros.append(("RPC_PY_WITH_CUDA", "1"))
    include_dirs.append(os.path.join(CUDA_HOME, "include"))
    library_dirs.append(_cuda_libdir(CUDA_HOME))
    # Static runtime: the .so carries cudart; only the driver (libcuda) is found at run time.
    libraries += ["cudart_static", "dl", "rt", "pthread"]
    if GLIBC:
        # zig's -lstdc++ would mean its own libc++; the host code (and cudart) wants GNU's ABI.
        ldflags += [_gcc_file("libstdc++.so"), _gcc_file("libgcc_s.so.1")]
    else:
        libraries.append("stdc++")
    # SASS for each architecture; PTX of the lowest (any newer GPU without SASS here can JIT it) and
    # of the highest (the best code for GPUs newer than this nvcc).
    CUDA_ARCHS = _cuda_archs(NVCC)
    PTX_ARCHS = sorted({CUDA_ARCHS[0], CUDA_ARCHS[-1]})
    gencode = []
    for a in CUDA_ARCHS:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    for a in PTX_ARCHS:
        gencode += ["-gencode", f"arch=compute_{a},code=compute_{a}"]
    print("rpc_py: CUDA SASS for " + " ".join(f"sm_{a}" for a in CUDA_ARCHS)
          + ", PTX for " + " ".join(f"compute_{a}" for a in PTX_ARCHS))
    nvcc_flags = [
        "-O3", "--std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        "--threads", "0",  # the architectures of one file compile in parallel (0: one per CPU)
        *gencode,
        "-DRPC_PY_WITH_CUDA=1",
    ]
    if WERROR:
        nvcc_flags += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


class BuildExt(build_ext):
    """build_ext that sends .cu files to nvcc and everything else to the C compiler."""

    def build_extensions(self):
        compiler = self.compiler
        if ".cu" not in compiler.src_extensions:
            compiler.src_extensions.append(".cu")
        default_compile = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cu"):
                if not WITH_CUDA:
                    raise RuntimeError(f"{src}: CUDA source in a CPU-only build")
                cmd = [NVCC, "-c", src, "-o", obj] + pp_opts + nvcc_flags
                self.spawn(cmd)
                return
            default_compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        compiler._compile = _compile
        if GLIBC:
            # Only the link changes: objects come from gcc/nvcc as usual (OpenMP needs gcc's GOMP ABI).
            target = f"{platform.machine()}-linux-gnu.{GLIBC}"
            linker = _find_zig() + ["cc", "-target", target, "-shared"]
            compiler.set_executables(linker_so=linker)
            if hasattr(compiler, "linker_so_cxx"):
                compiler.set_executables(linker_so_cxx=linker)
        try:
            super().build_extensions()
        finally:
            compiler._compile = default_compile


ext = Extension(
    "rpc_py._C",
    sources=sources,
    depends=depends,
    include_dirs=include_dirs,
    define_macros=macros,
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    libraries=libraries,
    library_dirs=library_dirs,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
