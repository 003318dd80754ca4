"""RPCConfig: validation messages, repr, and the length schedule against a step-by-step simulation."""

import pytest

from rpc_py.config import RPCConfig


def simulate(rpc: RPCConfig, prompt: int, steps: int):
    """Literal transcription of the schedule in docs/algorithm.md: append one token per step,
    compress when m == P + R. Returns the length after every step and the peak length."""
    length, kept, n, out, peak = prompt, 0, 0, [], prompt
    for _ in range(steps):
        length += 1
        peak = max(peak, length)
        m = length - prompt - kept
        if rpc.enabled and m == rpc.interval + rpc.window:
            n += 1
            kept = n * rpc.kept_per_interval
            if rpc.budget is not None:
                kept = min(kept, rpc.budget)
            length = prompt + kept + rpc.window
        out.append(length)
    return out, peak


@pytest.mark.parametrize(
    "rpc",
    [
        RPCConfig(interval=16, window=4, ratio=4),
        RPCConfig(interval=8, window=16, ratio=2),
        RPCConfig(interval=5, window=3, ratio=5),
        RPCConfig(interval=16, window=4, ratio=4, budget=6),
        RPCConfig(interval=16, window=4, ratio=4, budget=0),
        RPCConfig(interval=16, window=4, enabled=False),
    ],
)
@pytest.mark.parametrize("prompt", [0, 1, 13])
def test_schedule_matches_simulation(rpc, prompt):
    steps = 150
    expected, peak = simulate(rpc, prompt, steps)
    assert rpc.length_schedule(prompt, steps) == expected
    for max_new in (1, 2, 20, 21, 22, 57, 151):
        _, p = simulate(rpc, prompt, max_new - 1)
        assert rpc.peak_length(prompt, max_new) == p, max_new
    assert rpc.physical_length(prompt, 0) == prompt


def test_defaults_and_derived():
    rpc = RPCConfig()
    assert (rpc.interval, rpc.window, rpc.ratio, rpc.budget) == (4096, 32, 4, None)
    assert (rpc.pooling, rpc.kernel_size, rpc.aggregation, rpc.enabled) == ("avg", 7, "all", True)
    assert rpc.kept_per_interval == 1024
    assert rpc.compressions_after(4096 + 31) == 0
    assert rpc.compressions_after(4096 + 32) == 1
    assert rpc.compressions_after(2 * 4096 + 32) == 2
    assert rpc.physical_length(100, 4096 + 32) == 100 + 1024 + 32
    assert RPCConfig(ratio=3, interval=10).kept_per_interval == 3


def test_repr_and_frozen():
    assert repr(RPCConfig(interval=16, window=4)) == (
        "RPCConfig(interval=16, window=4, ratio=4, pooling='avg', kernel_size=7, aggregation='all')"
    )
    assert "budget=8" in repr(RPCConfig(budget=8))
    assert repr(RPCConfig(enabled=False)) == "RPCConfig(enabled=False)"
    rpc = RPCConfig()
    with pytest.raises(Exception):
        rpc.interval = 3
    assert rpc.replace(window=8).window == 8
    assert RPCConfig(window=8) == RPCConfig(window=8)
    assert hash(RPCConfig(window=8)) == hash(RPCConfig(window=8))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(interval=0), ValueError, "RPCConfig.interval"),
        (dict(interval=2.5), TypeError, "RPCConfig.interval"),
        (dict(window=0), ValueError, "RPCConfig.window"),
        (dict(window=True), TypeError, "RPCConfig.window"),
        (dict(ratio=0), ValueError, "RPCConfig.ratio"),
        (dict(interval=3, ratio=4), ValueError, "RPCConfig.interval"),
        (dict(budget=-1), ValueError, "RPCConfig.budget"),
        (dict(budget="10"), TypeError, "RPCConfig.budget"),
        (dict(pooling="mean"), ValueError, "RPCConfig.pooling"),
        (dict(kernel_size=4), ValueError, "RPCConfig.kernel_size"),
        (dict(kernel_size=0), ValueError, "RPCConfig.kernel_size"),
        (dict(aggregation="none"), ValueError, "RPCConfig.aggregation"),
        (dict(enabled=1), TypeError, "RPCConfig.enabled"),
    ],
)
def test_validation_names_the_field(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace(".", r"\.")):
        RPCConfig(**kwargs)
    with pytest.raises(exc, match=words.replace(".", r"\.")):
        RPCConfig().replace(**kwargs)


def test_physical_length_rejects_negative():
    with pytest.raises(ValueError):
        RPCConfig().physical_length(-1, 0)
