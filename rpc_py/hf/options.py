"""What one ``generate`` call asks for, whichever way its options arrive.

``model.generate`` takes options as keywords, inside a ``GenerationConfig`` passed by keyword or as
its second positional argument, and from ``model.generation_config`` for whatever neither sets.
rpc_py checks the *effective* configuration, built by the same transformers function that
``generate`` itself calls (``GenerationMixin._prepare_generation_config``, present with this
signature from transformers 5.0 to at least 5.24), so an option refused by keyword is refused
however it arrives, and options rpc_py needs (``max_new_tokens``, ``output_attentions``) are read
from the same place ``generate`` reads them.

Positional arguments are matched to ``model.generate``'s own parameters (read from its signature),
so ``rpc_py.generate(model, ids, generation_config, logits_processor, ...)`` means what
``model.generate(ids, generation_config, logits_processor, ...)`` means.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from transformers import GenerationConfig

from .cache import RPCCache

__all__ = ["GenerateCall", "bind_generate_arguments", "resolve_call", "generate_parameters"]

_PARAMS: dict[type, tuple[tuple[str, ...], frozenset]] = {}


def generate_parameters(model) -> tuple[tuple[str, ...], frozenset]:
    """(positional parameter names of ``model.generate`` after ``self``, every named parameter)."""
    cls = type(model)
    found = _PARAMS.get(cls)
    if found is None:
        params = list(inspect.signature(cls.generate).parameters.values())[1:]
        positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        named = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        found = _PARAMS[cls] = (positional, named)
    return found


def bind_generate_arguments(model, args: tuple, kwargs: dict) -> dict:
    """The arguments of a ``model.generate(*args, **kwargs)`` call, all by name."""
    positional, _ = generate_parameters(model)
    if len(args) > len(positional):
        raise TypeError(
            f"rpc_py: generate() takes at most {len(positional)} positional arguments after the model "
            f"({', '.join(positional)}), got {len(args)}"
        )
    named = {}
    for name, value in zip(positional, args):
        if name in kwargs:
            raise TypeError(f"rpc_py: generate() got multiple values for argument '{name}'")
        named[name] = value
    named.update(kwargs)
    return named


def effective_generation_config(model, named: dict) -> GenerationConfig:
    """The GenerationConfig ``model.generate`` will run with for these arguments."""
    gc = named.get("generation_config")
    if gc is not None and not isinstance(gc, GenerationConfig):
        hint = ""
        if isinstance(gc, torch.Tensor):
            hint = (" (as in model.generate, the argument after the inputs is generation_config; pass the mask "
                    "as attention_mask=...)")
        raise TypeError(f"rpc_py: generation_config: expected a transformers GenerationConfig, got "
                        f"{type(gc).__name__}{hint}")
    _, params = generate_parameters(model)
    options = {k: v for k, v in named.items() if k not in params}
    prepare = getattr(model, "_prepare_generation_config", None)
    if callable(prepare):
        config, _ = prepare(gc, **options)
    else:  # a generate without transformers' config preparation: its documented precedence
        config = copy.deepcopy(gc if gc is not None else model.generation_config)
        config.update(**options)
    return config


_MODES = {
    "greedy_search": None,
    "sample": None,
    "beam_search": "beam search (num_beams={num_beams})",
    "beam_sample": "beam search (num_beams={num_beams}, do_sample=True)",
    "group_beam_search": "group beam search (num_beams={num_beams}, num_beam_groups={num_beam_groups})",
    "constrained_beam_search": "constrained beam search (constraints / force_words_ids)",
    "contrastive_search": "contrastive search (penalty_alpha={penalty_alpha}, top_k={top_k})",
    "dola_generation": "DoLa decoding (dola_layers={dola_layers!r})",
}


def _assisted_reason(config, named) -> str:
    if named.get("assistant_model") is not None:
        return "assistant_model=..."
    if getattr(config, "prompt_lookup_num_tokens", None) is not None:
        return f"prompt-lookup decoding, prompt_lookup_num_tokens={config.prompt_lookup_num_tokens}"
    if getattr(config, "assistant_early_exit", None) is not None:
        return f"assistant_early_exit={config.assistant_early_exit}"
    return "multi-token prediction" if getattr(config, "use_mtp", None) else "draft tokens"


def check_generation(config: GenerationConfig, named: dict) -> None:
    """Refuse what RPC cannot serve; a clear error naming the option and what to do instead."""
    if named.get("custom_generate") is not None:
        raise NotImplementedError("rpc_py: custom generation loops (custom_generate=...) are not supported with RPC")
    mode = config.get_generation_mode(named.get("assistant_model"))
    mode = str(getattr(mode, "value", mode))
    if mode == "assisted_generation":
        raise NotImplementedError(
            f"rpc_py: assisted decoding ({_assisted_reason(config, named)}) is not supported with RPC: it appends "
            "several draft tokens per step and crops the rejected ones, which a compressed cache cannot undo"
        )
    if mode not in _MODES or _MODES[mode] is not None:
        what = _MODES.get(mode) or f"generation mode {mode!r}"
        fields = {k: getattr(config, k, None) for k in ("num_beams", "num_beam_groups", "penalty_alpha", "top_k",
                                                         "dola_layers")}
        raise NotImplementedError(
            f"rpc_py: {what.format(**fields)} is not supported with RPC; use greedy decoding or sampling "
            "(num_beams=1)"
        )
    if config.use_cache is False:
        raise ValueError("rpc_py: use_cache=False leaves nothing to compress; drop it or use model.generate")
    if config.cache_implementation is not None:
        raise ValueError(
            f"rpc_py: cache_implementation={config.cache_implementation!r} conflicts with the RPC cache; "
            "pass cache_implementation=None"
        )


@dataclasses.dataclass
class GenerateCall:
    """One checked generate call: its arguments by name, effective config and what sizes the cache."""

    named: dict
    config: GenerationConfig
    cache: RPCCache | None  # the caller's own cache, if any
    cache_name: str | None  # the keyword it came in
    prompt_length: int
    padding: torch.Tensor | None
    max_new_tokens: int | None


def resolve_call(model, args: tuple, kwargs: dict) -> GenerateCall:
    named = bind_generate_arguments(model, args, kwargs)
    config = effective_generation_config(model, named)
    check_generation(config, named)
    user_cache, cache_name = None, None
    for key in ("past_key_values", "cache"):
        given = named.get(key)
        if given is not None:
            if not isinstance(given, RPCCache):
                raise ValueError(
                    f"rpc_py: {key}={type(given).__name__}(...): RPC creates its own cache for each call; "
                    "pass nothing, or an RPCCache"
                )
            user_cache, cache_name = given, key
            break
    inputs = named.get("inputs")
    if inputs is None:
        inputs = named.get("input_ids")
    embeds = named.get("inputs_embeds")
    prompt_length = 0
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        prompt_length = inputs.shape[-1]
    elif isinstance(embeds, torch.Tensor):
        prompt_length = embeds.shape[1]
    padding = None
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        padding = (mask.cumsum(-1) == 0).sum(-1).cpu()  # leading zeros = left padding
    max_new = config.max_new_tokens
    if max_new is None and config.max_length is not None:
        # generate reads an unset max_length (the library default) as that many *new* tokens
        gc = named.get("generation_config")
        default_length = (named.get("max_length") is None and (gc is None or gc.max_length is None)
                          and getattr(model.generation_config, "max_length", None) is None)
        max_new = config.max_length if default_length else config.max_length - prompt_length
    return GenerateCall(
        named=named,
        config=config,
        cache=user_cache,
        cache_name=cache_name,
        prompt_length=prompt_length,
        padding=padding,
        max_new_tokens=None if max_new is None else max(int(max_new), 0),
    )
