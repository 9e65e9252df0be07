"""A numpy generator's state on the wire: how a server stage continues the client's random stream.

The client sends each row's PCG64 state (``rng_state``, int64 [6]), the server draws from exactly
that stream and sends the final state back, so a result is the same whichever side ran the loop.
"""
from __future__ import annotations

import numpy as np

from ..errors import ContractError, InputError

RNG_WORDS = 6  # PCG64 state: state (2 x 64 bit), inc (2 x 64 bit), has_uint32, uinteger
_MASK64 = (1 << 64) - 1


def generator_state(generator: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's full state as int64 [6] (uint64 words reinterpreted)."""
    state = generator.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        raise InputError(f"generator: the server-side loop continues PCG64 streams, got {state.get('bit_generator')!r}")
    value, inc = state["state"]["state"], state["state"]["inc"]
    words = [value >> 64, value & _MASK64, inc >> 64, inc & _MASK64, state["has_uint32"], state["uinteger"]]
    return np.array(words, dtype=np.uint64).view(np.int64)


def set_generator_state(generator: np.random.Generator, words: np.ndarray) -> np.random.Generator:
    """Put the state ``generator_state`` wrote into ``generator`` (a PCG64 one); returns it."""
    high, low, inc_high, inc_low, has_uint32, uinteger = (int(w) for w in np.asarray(words, np.int64).view(np.uint64))
    if has_uint32 not in (0, 1) or uinteger >= 1 << 32 or not inc_low & 1:
        raise ContractError(f"rng_state: {list(np.asarray(words))} is not a PCG64 state (odd increment, "
                            f"has_uint32 0/1, uinteger < 2**32 expected)")
    generator.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": has_uint32, "uinteger": uinteger,
                                     "state": {"state": high << 64 | low, "inc": inc_high << 64 | inc_low}}
    return generator


def generator_from_state(words: np.ndarray) -> np.random.Generator:
    return set_generator_state(np.random.Generator(np.random.PCG64()), words)
