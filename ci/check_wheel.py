"""Check the release artifacts made by ci/build_wheel.sh: a manylinux wheel and an sdist.

What a wheel must be to install on the clusters PyTorch's own wheels install on, checked on the
files themselves rather than trusted from the build flags:

* ``auditwheel show`` accepts it and the platform tag it finds, like every tag in the file name, is
  no newer than ``--max-glibc`` (PyTorch's wheels are manylinux_2_28);
* no shared object in it needs the CUDA runtime, the driver or libtorch (the runtime is linked
  statically, the driver is opened at run time, libtorch is never linked);
* every undefined symbol of the extension is either versioned (so the loader checks it against the
  installed glibc) or part of the Python C API: an unversioned libc symbol would resolve to
  whatever the process has, and fail only at run time on an old system; and libm's functions are
  imported from libm, not copied in from the linker's runtime (same numerics as a source build);
* the CUDA kernels are there: SASS for each ``--expect-sm`` and some PTX (``cuobjdump``);
* every file of the package in the source tree (code, and data such as ``rpc_py/**/weights/*``) is
  in the wheel and in the sdist; the sdist also has the C/CUDA sources, the licence and the tests.

Usage: python ci/check_wheel.py --repo . --max-glibc 2.28 --expect-sm "80 90 100 120" WHEEL SDIST
Exit status 1 with one line per problem when a check fails.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
FORBIDDEN_NEEDED = re.compile(r"^lib(cudart|cuda|nvrtc|cublas\w*|torch\w*|c10\w*)\.so")
LIBM = {f + suffix for f in ("exp", "exp2", "expm1", "log", "log2", "log1p", "pow", "sqrt", "tanh", "erf",
                              "sin", "cos", "fmod", "floor", "ceil", "round", "fabs") for suffix in ("", "f")}
JUNK = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.hypothesis)(/|$)|\.(py[cod]|so|o)$")


def platform_tags(wheel: str) -> list[str]:
    return os.path.basename(wheel)[: -len(".whl")].split("-")[-1].split(".")


def glibc_of(tag: str) -> tuple[int, int] | None:
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    if m:
        return int(m.group(1)), int(m.group(2))
    for name, version in LEGACY.items():
        if tag.startswith(name + "_"):
            return version
    return None


def source_files(repo: str, top: str) -> list[str]:
    """Files under ``top`` that the project ships: git's tracked and untracked-but-not-ignored files
    in a checkout, else everything but build products."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "--cached", "--others", "--exclude-standard", top],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        files = [f for f in out if f and os.path.isfile(os.path.join(repo, f))]
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(p, repo) for p in glob.glob(os.path.join(repo, top, "**", "*"), recursive=True)
                 if os.path.isfile(p)]
    return sorted(f for f in files if not JUNK.search(f))


def find_cuobjdump() -> str | None:
    for candidate in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(root, "bin", "cuobjdump")
    spec = importlib.util.find_spec("nvidia")  # the nvidia-cuda-cuobjdump package
    for base in (spec.submodule_search_locations or []) if spec else []:
        hits = glob.glob(os.path.join(base, "*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    return None


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", *args], capture_output=True, text=True, check=True).stdout


def check_wheel(wheel: str, args, problems: list[str]) -> None:
    name = os.path.basename(wheel)
    print(f"wheel: {name}  ({os.path.getsize(wheel) / 2**20:.2f} MiB)")

    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", wheel], capture_output=True, text=True)
    print("---- auditwheel show\n" + show.stdout.strip() + "\n----")
    if show.returncode != 0:
        problems.append(f"auditwheel show failed ({show.returncode}): {show.stderr.strip()[-500:]}")
    m = re.search(r'consistent with the\s+following platform tag:\s+"([^"]+)"', show.stdout)
    limit = tuple(int(x) for x in args.max_glibc.split("."))
    if not m:
        problems.append("auditwheel show names no platform tag")
    elif glibc_of(m.group(1)) is None or glibc_of(m.group(1)) > limit:
        problems.append(f"auditwheel finds {m.group(1)}: newer than manylinux_{args.max_glibc.replace('.', '_')}")
    for tag in platform_tags(wheel):
        version = glibc_of(tag)
        if version is None or version > limit:
            problems.append(f"platform tag {tag} in the file name is not manylinux <= {args.max_glibc}")

    with tempfile.TemporaryDirectory() as d:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            z.extractall(d)
        objects = [n for n in names if re.search(r"\.so(\.\d+)*$", n)]
        extension = [n for n in objects if re.match(r"rpc_py/_C\..*\.so$", n)]
        if len(extension) != 1:
            problems.append(f"expected one rpc_py/_C*.so in the wheel, found {extension}")
        for obj in sorted(objects):
            path = os.path.join(d, obj)
            needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf("-dW", path))
            print(f"{obj}: {os.path.getsize(path) / 2**20:.2f} MiB, needs {', '.join(needed)}")
            bad = [n for n in needed if FORBIDDEN_NEEDED.match(n)]
            if bad:
                problems.append(f"{obj} needs {bad} (CUDA runtime/driver or libtorch must not be linked)")
        for obj in extension:
            path = os.path.join(d, obj)
            loose = []
            for line in readelf("--dyn-syms", "-W", path).splitlines():
                cols = line.split()
                if len(cols) < 8 or cols[6] != "UND" or not cols[7]:
                    continue
                sym, bind = cols[7], cols[4]
                if "@" in sym or bind == "WEAK" or re.match(r"_?Py", sym):
                    continue
                loose.append(sym)
            if loose:
                problems.append(f"{obj}: unversioned undefined symbols (would bind to anything at run time): {loose[:20]}")
            # Math must come from the system's libm, as in a source build: a copy linked in from the
            # linker's own runtime (zig's compiler-rt defines exp, expf, sqrt, ...) would change the
            # numerics of the kernels between the wheel and a source build.
            own = {line.split()[-1] for line in readelf("-sW", path).splitlines()
                   if len(line.split()) >= 8 and line.split()[6] != "UND" and line.split()[3] == "FUNC"}
            copied = sorted(own & LIBM)
            if copied:
                problems.append(f"{obj}: libm functions linked into the extension instead of imported: {copied}")
            sections = readelf("-SW", path)
            if args.expect_sm:
                if ".nv_fatbin" not in sections:
                    problems.append(f"{obj} has no CUDA kernels (no .nv_fatbin): was nvcc found?")
                else:
                    check_cuda(path, args.expect_sm, problems)

        files = source_files(args.repo, "rpc_py")
        missing = [f for f in files if f not in names]
        if missing:
            problems.append(f"package files missing from the wheel: {missing[:20]}")
        print(f"package files in the wheel: {len(files) - len(missing)} of {len(files)} from the source tree")
        metadata = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            problems.append("no METADATA in the wheel")
        else:
            text = open(os.path.join(d, metadata), encoding="utf-8").read()
            for field in ("Version:", "License-Expression: MIT", "Requires-Python:", "Classifier:", "Project-URL:"):
                if field not in text:
                    problems.append(f"METADATA has no {field!r}")
        if not any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names):
            problems.append("the wheel carries no LICENSE")


def check_cuda(path: str, expect: list[str], problems: list[str]) -> None:
    tool = find_cuobjdump()
    if tool is None:
        problems.append("cuobjdump not found (CUDA toolkit, $CUOBJDUMP or pip install nvidia-cuda-cuobjdump)")
        return
    elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True)
    ptx = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True)
    sass = sorted(set(re.findall(r"\.sm_(\d+)\.cubin", elf.stdout)), key=int)
    ptxs = sorted(set(re.findall(r"\.sm_(\d+)\.ptx", ptx.stdout)), key=int)
    print(f"CUDA: SASS for sm_{', sm_'.join(sass) or '-'}; PTX for compute_{', compute_'.join(ptxs) or '-'}")
    lacking = [a for a in expect if a not in sass]
    if lacking:
        problems.append(f"no SASS for sm_{lacking} (has {sass})")
    if not ptxs:
        problems.append("no PTX in the extension (no forward compatibility with newer GPUs)")


def check_sdist(sdist: str, args, problems: list[str]) -> None:
    print(f"sdist: {os.path.basename(sdist)}  ({os.path.getsize(sdist) / 2**20:.2f} MiB)")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = source_files(args.repo, "rpc_py") + source_files(args.repo, "csrc") + source_files(args.repo, "tests")
    wanted += ["LICENSE", "README.md", "CHANGELOG.md", "setup.py", "pyproject.toml", "PKG-INFO"]
    missing = [f for f in wanted if f not in names]
    if missing:
        problems.append(f"files missing from the sdist: {missing[:20]}")
    junk = sorted(n for n in names if JUNK.search(n))
    if junk:
        problems.append(f"build products in the sdist: {junk[:10]}")
    print(f"sdist: {len(names)} files, {len(wanted) - len(missing)} of {len(wanted)} expected present")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", help="wheel(s) and sdist(s)")
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--max-glibc", default="2.28")
    parser.add_argument("--expect-sm", default="80 90 100 120", help='SASS the extension must carry; "" skips')
    args = parser.parse_args()
    args.expect_sm = args.expect_sm.split()
    problems: list[str] = []
    wheels = [a for a in args.artifacts if a.endswith(".whl")]
    sdists = [a for a in args.artifacts if a.endswith(".tar.gz")]
    if not wheels or not sdists:
        problems.append(f"expected a wheel and an sdist, got {args.artifacts}")
    for w in wheels:
        check_wheel(w, args, problems)
    for s in sdists:
        check_sdist(s, args, problems)
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    if not problems:
        print("OK: wheel and sdist checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
