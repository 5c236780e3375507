"""Samplers: what K loops (sampler steps) of a trained network are at inference, kept apart from
the losses that train it (loopdb.objectives), as EDM keeps its sampler apart from its loss.

Every sampler takes the network as an argument and holds no weights:
- ``next_token``: the next-token language models. The model's ``loop`` setting names its sampler
  (``sampler_of``): diffusion (K loops = K steps of the ODE solver on a sigma grid), recurrent
  (K iterations of the core from a random state) or dense (the layers once; K is ignored);
- ``masked``: MD4's ancestral unmasking sampler of the masked diffusion LM;
- ``vision``: the ViT's label sampler and the DiT's image sampler.
The solver loop itself is loopdb.maths.sampler.run_sampler, a pure function of
(denoiser, initial state, grid).
"""

from .next_token import (DENSE, DIFFUSION, JOINT, OBJECTIVE_LOOPS, RECURRENT, SAMPLERS, DenseSampler, DiffusionSampler,
                         JointSampler, RecurrentSampler, anchor_sampler, sampler_of)

__all__ = ["DENSE", "DIFFUSION", "JOINT", "OBJECTIVE_LOOPS", "RECURRENT", "SAMPLERS", "DenseSampler", "DiffusionSampler",
           "JointSampler", "RecurrentSampler", "anchor_sampler", "sampler_of"]
