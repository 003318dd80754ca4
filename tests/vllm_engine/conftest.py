"""The vLLM tests (rpc_py.vllm) run only where vLLM's CPU build is installed: their own virtual
environment (ci/test_vllm.sh, called by .ci/run). Elsewhere each test module skips, except where
RPC_PY_VLLM_REQUIRED=1 (ci/test_vllm.sh sets it): there a vLLM that does not import is an error, so
the stage can never pass by skipping everything."""

import os

if os.environ.get("RPC_PY_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (an ImportError here fails the run)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The engine core (and its scheduler) in the test process, so the tests can read the block pool.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
