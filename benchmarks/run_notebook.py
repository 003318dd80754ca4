"""Execute a notebook of this repository in place (outputs saved), without Jupyter's front end.

    python benchmarks/run_notebook.py notebooks/ablation.ipynb           # full sweep
    python benchmarks/run_notebook.py notebooks/ablation.ipynb --quick   # RPC_PY_QUICK=1 (CI's mode)

The notebook runs with its own folder as working directory, on the `python3` kernel (ipykernel).
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook")
    p.add_argument("--quick", action="store_true", help="set RPC_PY_QUICK=1 (the small sweep CI runs)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--output", help="write the executed notebook here instead of in place")
    args = p.parse_args(argv)

    import nbclient
    import nbformat

    if args.quick:
        os.environ["RPC_PY_QUICK"] = "1"
    nb = nbformat.read(args.notebook, as_version=4)
    folder = os.path.dirname(os.path.abspath(args.notebook))
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": folder}}).execute()
    out = args.output or args.notebook
    nbformat.write(nb, out)
    print(f"executed {args.notebook} in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
