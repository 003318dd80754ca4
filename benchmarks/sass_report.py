"""CPU-side evidence about the CUDA kernels, without a GPU: compile them for sm_90, read the ptxas
report and the SASS, and estimate what the inner loops cost per byte of KV they stream.

For every kernel of ``csrc/kernels/*.cu``: registers, spill bytes, static shared memory (ptxas ``-v``), and,
for the kernels that stream K/V, the main loop of the SASS (``cuobjdump -sass``). A loop is found by its
back edge: a branch whose target lies at a lower address; its body is [target, branch]. The main loop
of a kernel is the largest loop that holds the kernel's streaming instruction (``LDGSTS`` = cp.async,
``LDG`` for the plain-load kernels); loops nested inside it are listed and counted with the trip
counts given in ``STREAMING`` below (static counts, not a profile).

From the loop body the report derives warp-instructions per KV byte and two lower bounds on time at
the issue's shapes (H200: 132 SMs, 4 schedulers of 1 warp-instruction per clock each, 16 MUFU
results per clock per SM, 1.98 GHz boost clock, 790 TFLOP/s bf16 tensor rate as measured for matmul):
  issue bound = warp-instructions / (132 * 4 * clock),   MUFU bound = exp2 results / (132 * 16 * clock),
  tensor bound = mma FLOPs / 790e12 (optimistic for mma.sync),
next to the bytes floor (bytes / 4.27 TB/s, the measured device copy bandwidth). These are estimates
from SASS, not measurements: they ignore memory latency, dependency stalls and tensor-core limits.

Usage (needs nvcc and cuobjdump; pip's ``nvidia-cuda-cuobjdump`` provides the latter):
    python benchmarks/sass_report.py [--json benchmarks/results/sass_report_sm90.json] [--cuobjdump PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SMS, SCHEDULERS, MUFU_PER_SM, CLOCK_HZ, BW = 132, 4, 16, 1.98e9, 4.27e12
TC_FLOPS = 790e12  # measured bf16 matmul ceiling on the H200 (wgmma); mma.sync reaches less: optimistic bound


def find_tool(name: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    path = shutil.which(name)
    if path:
        return path
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    try:  # pip wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvcc
        import nvidia  # noqa: F401

        for base in nvidia.__path__:
            hits = glob.glob(os.path.join(base, "*", "bin", name))
            if hits:
                return hits[0]
    except ImportError:
        pass
    return None


def demangle(names: list[str]) -> dict[str, str]:
    cf = shutil.which("c++filt")
    if not cf or not names:
        return {n: n for n in names}
    out = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """`(anonymous namespace)::v2::decode_v2_kernel<__nv_bfloat16, 128>(...)` -> `v2::decode_v2_kernel<bf16, 128>`."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = s[5:] if s.startswith("void ") else s
    s = re.sub(r"\(.*\)$", "", s)
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("unsigned short", "u16")
    s = s.replace("unsigned int", "u32").replace("uint4", "u128").replace("uint2", "u64")
    return s


# ------------------------------------------------------------------------------------------- ptxas


def compile_cubin(src: str, arch: str, out: str) -> str:
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-O3", "--std=c++17", "-I", os.path.join(ROOT, "csrc", "kernels"),
           "-Xptxas", "-v", src, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"nvcc failed on {src}:\n{r.stderr}")
    return r.stderr


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per mangled function: registers, spill stores/loads, static shared memory, stack."""
    res: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            res[cur] = dict(registers=None, spill_stores=0, spill_loads=0, smem_static=0, stack=0)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            res[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            if m2:
                res[cur]["smem_static"] = int(m2.group(1))
    return res


# -------------------------------------------------------------------------------------------- SASS

INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = INSN.match(line)
        if m:
            funcs[cur].append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t else ""


def loops(insns: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) index ranges of loops, from back-edge branches."""
    index = {addr: i for i, (addr, _) in enumerate(insns)}
    out = []
    for i, (addr, text) in enumerate(insns):
        op = opcode(text)
        if op.startswith("BRA") or op.startswith("JMP"):
            m = re.search(r"0x([0-9a-f]+)", text.split(op, 1)[1])
            if m:
                target = int(m.group(1), 16)
                if target <= addr and target in index:
                    out.append((index[target], i))
    return out


CLASSES = [("HMMA", "mma"), ("LDSM", "ldmatrix"), ("LDGSTS", "cp.async"), ("LDG", "ld.global"),
           ("STG", "st.global"), ("LDS", "ld.shared"), ("STS", "st.shared"), ("MUFU", "mufu"),
           ("SHFL", "shfl"), ("BAR", "barrier"), ("FFMA", "ffma"), ("FMUL", "fmul"), ("FADD", "fadd"),
           ("FMNMX", "fmnmx"), ("F2F", "cvt"), ("BRA", "branch")]


def mix(insns: list[tuple[int, str]]) -> dict[str, int]:
    counts = {label: 0 for _, label in CLASSES}
    counts["other"] = 0
    counts["total"] = len(insns)
    for _, text in insns:
        op = opcode(text)
        for prefix, label in CLASSES:
            if op == prefix or op.startswith(prefix + "."):
                counts[label] += 1
                break
        else:
            counts["other"] += 1
    return counts


# --------------------------------------------------------------------------- what the loops stream

# Kernel name regex -> how to read its main loop: the streaming opcode, KV bytes per loop iteration,
# warps that execute each iteration, trip counts of loops nested in the main loop (by nesting order),
# and the work (iterations) at the issue's shapes.
DEC = dict(B=32, Hkv=4, Hq=28, D=128, L=16384)           # decode attention goal shape
CMP = dict(B=32, Hkv=4, Hq=28, R=32, D=128, N=11424 - 32 - 128, keep=8192, window=32)  # compression shape


def streaming(name: str) -> dict | None:
    m = re.search(r"decode_v2_kernel<(\w+), (\d+)>", name)
    if m:
        D = int(m.group(2))
        b = 16 * D * 2 * 2  # one 16-key K and V tile per warp iteration
        iters = DEC["B"] * DEC["Hkv"] * DEC["L"] // 16 if D == DEC["D"] and m.group(1) == "bf16" else None
        return dict(op="cp.async", bytes=b, warps=1, nested=[], iters=iters,
                    shape_bytes=DEC["B"] * DEC["Hkv"] * DEC["L"] * D * 2 * 2, what="decode v2, per warp: 16 keys")
    m = re.search(r"decode_split_kernel<(\w+), (\d+), (\d+)>", name)
    if m:
        es = 4 if m.group(1) == "float" else 2
        D, GM = int(m.group(2)), int(m.group(3))
        keys = 32 // (D // 8)
        iters = None
        if D == DEC["D"] and m.group(1) == "bf16" and GM == 8:
            iters = DEC["B"] * DEC["Hkv"] * DEC["L"] // keys
        return dict(op="ld.global", bytes=keys * D * es * 2, warps=1, nested=[], iters=iters,
                    shape_bytes=DEC["B"] * DEC["Hkv"] * DEC["L"] * D * 2 * 2,
                    what=f"decode v1, per warp: {keys} keys x {GM} heads")
    m = re.search(r"score_v2_kernel<(\w+), (\d+), (\d+), (true|false), (true|false)>", name)
    if m and m.group(5) == "true":  # the D = 16 * KS instantiations (64, 128, 256); the others run other D
        KS, SPW = int(m.group(2)), int(m.group(3))
        D = 16 * KS
        # the launcher's plan (score_plan in score_cuda.cu) for the compression shape
        stripes = -(-(CMP["Hq"] // CMP["Hkv"] * CMP["R"]) // 16)
        groups = -(-stripes // (8 * SPW))
        warps = -(-(-(-stripes // groups)) // SPW)
        cpr = D // 8
        copy_trips = -(-32 // ((32 * warps) // cpr))  # rows per thread of the fixed copy mapping
        iters = None
        if D == CMP["D"] and m.group(1) == "bf16":
            iters = CMP["B"] * CMP["Hkv"] * -(-CMP["N"] // 32)
        # nested loops: the K-tile copy (every warp), then in pass 2 the cross-warp sum, which only warp 0
        # runs, `warps` trips: the same per-CTA cost as one trip in each warp
        return dict(op="cp.async", bytes=32 * D * 2, warps=warps, nested=[copy_trips, 1], iters=iters,
                    shape_bytes=CMP["B"] * CMP["Hkv"] * CMP["N"] * D * 2,
                    what=f"score v2 pass {2 if m.group(4) == 'true' else 1}, per CTA: 32 keys x {warps} warps")
    m = re.search(r"compact_kernel<(\w+)>", name)
    if m:
        w = {"u128": 16, "u64": 8, "u32": 4, "u16": 2}.get(m.group(1), 16)
        iters = None
        moved = (CMP["keep"] + CMP["window"]) * CMP["B"] * CMP["Hkv"] * CMP["D"] * 2 * 2  # K and V, bf16
        if w == 16:
            iters = moved // (32 * 8 * 16)
        return dict(op="ld.global", bytes=32 * 8 * w, warps=1, nested=[], iters=iters, shape_bytes=2 * moved,
                    what="compaction, per warp: 8 words per lane (bytes read)")
    return None


def analyse_loop(insns, info):
    found = loops(insns)
    key = info["op"]
    cands = [(s, e) for s, e in found if mix(insns[s : e + 1])[key] > 0]
    if not cands:
        return None
    s, e = max(cands, key=lambda r: r[1] - r[0])
    inner = sorted([(a, b) for a, b in found if s <= a and b <= e and (a, b) != (s, e)])
    # keep outermost nested loops only
    top = []
    for a, b in inner:
        if not any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for a2, b2 in inner):
            top.append((a, b))
    body = mix(insns[s : e + 1])
    total = body["total"]
    nested = []
    for k, (a, b) in enumerate(top):
        n = b - a + 1
        trips = info["nested"][k] if k < len(info["nested"]) else 1
        total += n * (trips - 1)
        nested.append(dict(instructions=n, trips=trips, mix=mix(insns[a : b + 1])))
    per_iter = total * info["warps"]
    mufu_iter = (body["mufu"] + sum(x["mix"]["mufu"] * (x["trips"] - 1) for x in nested)) * info["warps"]
    hmma_iter = body["mma"] * info["warps"]
    out = dict(start=hex(insns[s][0]), end=hex(insns[e][0]), static_instructions=body["total"], mix=body,
               nested=nested, instructions_per_iteration=per_iter, bytes_per_iteration=info["bytes"],
               instructions_per_byte=per_iter / info["bytes"], meaning=info["what"])
    if info["iters"]:
        issue_s = info["iters"] * per_iter / (SMS * SCHEDULERS * CLOCK_HZ)
        mufu_s = info["iters"] * mufu_iter * 32 / (SMS * MUFU_PER_SM * CLOCK_HZ)
        tc_s = info["iters"] * hmma_iter * 16 * 8 * 16 * 2 / TC_FLOPS
        out["estimate"] = dict(iterations=info["iters"], issue_bound_ms=issue_s * 1e3, mufu_bound_ms=mufu_s * 1e3,
                               tensor_bound_ms=tc_s * 1e3, bytes=info["shape_bytes"],
                               bytes_floor_ms=info["shape_bytes"] / BW * 1e3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--cuobjdump", default=None)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "sass_report_sm90.json"))
    ap.add_argument("--sources", nargs="*", default=None, help="default: the scoring, compaction and decode kernels (csrc/kernels/)")
    args = ap.parse_args(argv)
    if not shutil.which("nvcc"):
        sys.exit("nvcc not found")
    cuobjdump = find_tool("cuobjdump", args.cuobjdump)
    if not cuobjdump:
        sys.exit("cuobjdump not found: install it (pip install nvidia-cuda-cuobjdump) or pass --cuobjdump PATH")
    sources = args.sources or [os.path.join(ROOT, "csrc", "kernels", f)
                               for f in ("score_cuda.cu", "compact_cuda.cu", "decode_cuda.cu")]
    nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    kernels = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            ptx = parse_ptxas(compile_cubin(src, args.arch, cubin))
            sass = parse_sass(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                                             check=True).stdout)
            names = demangle(sorted(set(ptx) | set(sass)))
            for mangled in sorted(set(ptx) | set(sass), key=lambda n: short_name(names[n])):
                name = short_name(names[mangled])
                entry = dict(kernel=name, source=os.path.relpath(src, ROOT), **ptx.get(mangled, {}))
                info = streaming(name)
                if info and mangled in sass:
                    entry["loop"] = analyse_loop(sass[mangled], info)
                kernels.append(entry)
    report = dict(arch=args.arch, nvcc=nvcc_version, cuobjdump=cuobjdump, machine=platform.machine(),
                  model=dict(sms=SMS, schedulers=SCHEDULERS, mufu_per_sm_clock=MUFU_PER_SM, clock_hz=CLOCK_HZ,
                             bandwidth=BW),
                  shapes=dict(decode=DEC, compression=CMP), kernels=kernels,
                  note="estimate from SASS, not measured")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    print(f"{args.arch}, {nvcc_version}; estimate from SASS, not measured")
    print(f"{'kernel':52s} {'regs':>4s} {'spill':>5s} {'smem':>5s}  {'loop':>5s} {'hmma':>4s} {'ldsm':>4s} "
          f"{'ld':>4s} {'mufu':>4s} {'shfl':>4s} {'B/iter':>6s} {'ins/B':>6s} {'issue ms':>8s} {'mufu ms':>7s} "
          f"{'tc ms':>6s} {'floor ms':>8s}")
    for k in kernels:
        lp = k.get("loop")
        spill = (k.get("spill_stores") or 0) + (k.get("spill_loads") or 0)
        row = f"{k['kernel'][:52]:52s} {k.get('registers') or 0:4d} {spill:5d} {k.get('smem_static') or 0:5d}"
        if lp:
            mx = lp["mix"]
            ld = mx["cp.async"] + mx["ld.global"]
            row += (f"  {lp['instructions_per_iteration']:5d} {mx['mma']:4d} {mx['ldmatrix']:4d} {ld:4d} "
                    f"{mx['mufu']:4d} {mx['shfl']:4d} {lp['bytes_per_iteration']:6d} {lp['instructions_per_byte']:6.3f}")
            est = lp.get("estimate")
            if est:
                row += (f" {est['issue_bound_ms']:8.3f} {est['mufu_bound_ms']:7.3f} {est['tensor_bound_ms']:6.3f}"
                        f" {est['bytes_floor_ms']:8.3f}")
        print(row)
    print("loop: warp-instructions per iteration of the main loop (nested loops x their trip counts); "
          "B/iter: KV bytes one iteration streams; ms columns at the issue's shapes (bf16, D=128): "
          "decode B=32 Hkv=4 Hq=28 L=16K, compression B=32 Hq=28 Hkv=4 R=32 N=11,264, keep 8,192.")
    return report


if __name__ == "__main__":
    main()
