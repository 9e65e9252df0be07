"""``plannet_sampler``: PlanNet's whole sampling loop in the server, one request per plan.

Why: PlanNet samples in 100 small steps (the tiny denoiser takes under a millisecond), so a
client-side loop pays one gRPC round trip and two Python-backend hops per step, more than the step
itself. The stage takes the encoder's memory and runs every level in the server.

Each row of a request is one plan with its own generator (``rng_state``, continued in the server:
see rng.py); rows that arrive together run as one loop with batched denoiser calls.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..contracts import PLANNET_DENOISER, STEP, ModelContract, TensorSpec
from .rng import RNG_WORDS, generator_state, set_generator_state

NAME = "plannet_sampler"
DENOISER = PLANNET_DENOISER.name
#: config parameter: "in-process" (ONNX Runtime in the stub) or "bls" (the served plannet_denoiser)
MODEL_CALL_PARAMETER = "denoiser_call"

_TOKENS = PLANNET_DENOISER.input("tokens")
CONTRACT = ModelContract(
    NAME, "layout", STEP,
    inputs=(
        PLANNET_DENOISER.input("memory"),
        PLANNET_DENOISER.input("memory_mask"),
        replace(_TOKENS, name="fixed_tokens", doc="given tokens (the product's class); mask_token where the sampler decides"),
        TensorSpec("steps", "int64", ("batch",), "levels visited, 1..num_timesteps; equal across one request", 1),
        TensorSpec("rng_state", "int64", ("batch", RNG_WORDS), "PCG64 state of each row's generator (generator_state)"),
    ),
    outputs=(
        replace(_TOKENS, name="tokens", doc="sampled tokens, no mask token left"),
        TensorSpec("final_rng_state", "int64", ("batch", RNG_WORDS), "each generator's state after the loop"),
    ),
    doc="The whole PlanNet sampling loop in the server: one request per plan instead of one per step.",
)


def contract(bundle) -> ModelContract:
    return CONTRACT.resolve(bundle.models[DENOISER].static_dims)


def settings(bundle) -> dict:
    return {"config": bundle.config["plannet"]}


def encode(contract: ModelContract, memory: np.ndarray, memory_mask: np.ndarray, fixed_tokens: np.ndarray, steps: int,
           generators: list[np.random.Generator]):
    """``PlanNetSampler.sample``'s work for each row with its own generator: the request, and the
    decoding of its answer (the tokens; each generator left where the server's loop left it)."""
    batch = len(generators)
    inputs = {"memory": memory, "memory_mask": memory_mask, "fixed_tokens": np.asarray(fixed_tokens, dtype=np.int64),
              "steps": np.full(batch, steps, dtype=np.int64),
              "rng_state": np.stack([generator_state(g) for g in generators])}

    def decode(outputs: dict) -> np.ndarray:
        for generator, words in zip(generators, outputs["final_rng_state"]):
            set_generator_state(generator, words)
        return outputs["tokens"]

    return inputs, decode
