"""An exported loopdb looped language model as a transformers model (`loopdb export` writes this file).

Self-contained: imports torch and transformers only, so the export loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` where loopdb is not installed.
The layers, the EDM sampler and the readouts repeat loopdb's (loopdb.layers, loopdb.maths.edm,
loopdb.models.looped / recurrent, loopdb.readouts.scoring / generation) operation for operation, and
the export's tests check the logits and the generated tokens against loopdb's own.

- ``recurrence="position"`` (DiffusionBlocks): a clean stream (prelude, core with a learned clean
  conditioning, coda) gives keys and values; a loop is one sampler step of the sigma-conditioned
  core on each position's noisy estimate of the NEXT token's embedding, which attends to the
  clean keys at positions <= its own and to itself.
- ``recurrence="sequence"`` (Huginn, Ouro): a loop updates the whole latent sequence,
  s_k = norm(core(inject(s_{k-1}, prelude(x)))); the coda and head read the last state.
- ``objective="diffusion"`` with ``recurrence="sequence"``: sequence-joint DiffusionBlocks (hf_joint.py),
  a loop is one sampler step over every position's state at once, with a sigma per position.
- ``draft_width`` L > 1 (drafting): a position's noisy state is L slots (slot j predicts token t+1+j),
  denoised jointly; the next token is slot 0. ``readout="anchor"`` reads the trained anchor head instead.
- ``family="stacked"``: ``n_layers`` distinct sigma-conditioned layers in ``num_blocks`` DiffusionBlocks;
  block b has its own clean stream from the token embeddings and is the denoiser of the b-th highest
  noise range, so a sampler step runs the block owning its sigma (K = num_blocks: each block once).
- ``objective``: diffusion (a loop = a sampler step on a sigma grid computed from K), bptt / ouro
  (a loop = a recurrent iteration from a random state), dense (the layers once; K is ignored).
- Noise is seeded (``noise_seed``): each row of a batch draws its initial state from its own
  generator seeded by the seed, so a row's numbers depend neither on the batch nor on padding.
- ``readout``: ``predictive`` returns log of the mean over ``num_samples`` draws of the last loop's
  next-token distribution (log-probabilities, loopdb's scoring readout); ``draw`` returns the raw
  last-loop logits of one draw.
- ``generate``: its own loop (not transformers' GenerationMixin.generate, whose cache and input
  handling assume one pass per token), with a ``LoopDBCache`` (a ``DynamicCache`` of one key/value
  slot per layer, per loop and layer where loops attend over the sequence), left-padded batches,
  lm-eval's stopping criteria, and adaptive exit for sequence recurrence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutput

from .hf_configuration import LoopDBConfig
from .hf_generation import _BatchStream, _RowStream, _RowStreams, _left_padding
from .hf_joint import JointRow, joint_encode, joint_loops
from .hf_layers import READOUTS, SAMPLER_CHOICES, RMSNorm, rotary_angles, Block, SigmaEmbedder, inject, padded_causal_mask, padded_positions, sigma_grid, block_owner, DiffusionBlock, log_mean_exp, ExitTracker, LoopDBCache

# -- the model ----------------------------------------------------------------------------------------------
class LoopDBForCausalLM(PreTrainedModel, GenerationMixin):
    """A loopdb looped LM. ``forward(input_ids, num_loops=K)``: logits of every position after K loops;
    ``generate(input_ids, num_loops=K, ...)``: batched, left-padded prompts, greedy or sampled."""

    config_class = LoopDBConfig
    base_model_prefix = "loopdb"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: LoopDBConfig):
        super().__init__(config)
        dim, position = config.d_model, config.recurrence == "position"
        self.sigma_data = config.sigma_data or dim**-0.5

        def blocks(count, conditioned=False, sandwich=False):
            return nn.ModuleList(Block(dim, config.n_heads, config.mlp_ratio, conditioned, sandwich)
                                 for _ in range(count))

        self.embedding = nn.Embedding(config.vocab_size, dim)
        if config.family == "stacked":
            self.sigma_embedder = SigmaEmbedder(dim)
            self.blocks = nn.ModuleList(DiffusionBlock(config) for _ in range(config.num_blocks))
            self.final_norm = RMSNorm(dim)
            self.head = None if config.tie_head else nn.Linear(dim, config.vocab_size, bias=False)
            self.self_condition = None
            self.target_norm = config.target_norm or self.sigma_data * dim**0.5
            self.target_scale = self.target_norm / dim**0.5
            self.post_init()
            return
        self.prelude = blocks(config.n_prelude)
        if config.joint:  # loopdb.models.joint: a sigma-conditioned core over the states, no clean stream
            self.core, self.coda = blocks(config.n_core, conditioned=True), blocks(config.n_coda)
            self.sigma_embedder = SigmaEmbedder(dim)
            self.injection = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
            self.final_norm = RMSNorm(dim)
            self.head = None if config.tie_head else nn.Linear(dim, config.vocab_size, bias=False)
            self.self_condition = None
            self.target_norm = config.target_norm or self.sigma_data * dim**0.5
            self.post_init()
            return
        self.core = blocks(config.n_core, conditioned=position, sandwich=config.sandwich_norm and not position)
        self.coda = blocks(config.n_coda)
        self.injection = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
        self.core_norm = RMSNorm(dim)
        self.final_norm = RMSNorm(dim)
        sequence_norm = not position and getattr(config, "embedded_norm", False)
        self.embedded_norm = RMSNorm(dim) if sequence_norm else None
        self.head = None if config.tie_head else nn.Linear(dim, config.vocab_size, bias=False)
        if position:
            self.sigma_embedder = SigmaEmbedder(dim)
            self.clean_condition = nn.Parameter(torch.zeros(dim))
            self.self_condition = nn.Linear(dim, dim, bias=False) if config.self_condition else None
            # drafting: the L noisy slots of a position (slot j predicts token t+1+j) told apart by a learned row
            self.slot_embedding = nn.Parameter(torch.zeros(config.draft_width, dim)) if config.draft_width > 1 else None
            self.denoiser_out = nn.Linear(dim, dim, bias=False)
            self.target_norm = config.target_norm or self.sigma_data * dim**0.5
            self.target_scale = self.target_norm / dim**0.5
        else:
            self.exit_gate = nn.Linear(dim, 1) if config.exit_gate else None
        self.post_init()

    def _init_weights(self, module):
        # loopdb's initialisation; an export always loads every weight from its safetensors
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    # -- shared pieces ----------------------------------------------------------------------------------------
    def _positions(self, index, pad):
        """cos, sin and mask for slots ``index`` over keys 0..index[-1]; pad (B,) or None (causal fast path)."""
        head_dim, context = self.config.d_model // self.config.n_heads, self.config.context
        if pad is None:
            cos, sin = rotary_angles(index, head_dim, context)
            return cos, sin, None
        cos, sin = rotary_angles(padded_positions(index, pad), head_dim, context)
        return cos, sin, padded_causal_mask(index, torch.arange(int(index[-1]) + 1, device=index.device), pad)

    def _run(self, layers, hidden, cos, sin, cond=None, prefixes=None, mask=None, cache=None, slots=None):
        """Hidden states through ``layers`` and each layer's (k, v): its own, or with ``cache``, the cached
        positions' followed by its own (the cache's ``slots`` per layer are extended)."""
        kv, hidden = [], hidden.to(self.embedding.weight.dtype)  # float32 sampler states into bf16 layers
        for index, layer in enumerate(layers):
            prefix = None if prefixes is None else prefixes[index]
            if cache is not None:
                prefix = cache.past(slots[index])
            hidden, layer_kv = layer(hidden, cos, sin, cond, prefix, mask)
            kv.append(layer_kv if cache is None else cache.update(*layer_kv, slots[index]))
        return hidden, kv

    def _cached_positions(self, length: int, pad, cache, device):
        """cos, sin and mask of ``length`` new positions after the cached ones (``cache`` may be None)."""
        start = 0 if cache is None else cache.length
        index = torch.arange(start, start + length, device=device)
        if start == 0:
            return self._positions(index, pad)
        head_dim, context, keys = self.config.d_model // self.config.n_heads, self.config.context, torch.arange(
            start + length, device=device)
        if pad is None:
            cos, sin = rotary_angles(index, head_dim, context)
            return cos, sin, keys[None, :] <= index[:, None]
        cos, sin = rotary_angles(padded_positions(index, pad), head_dim, context)
        return cos, sin, padded_causal_mask(index, keys, pad)

    def _logits(self, hidden):
        hidden = self.final_norm(hidden.to(self.embedding.weight.dtype))
        return hidden @ self.embedding.weight.t() if self.head is None else self.head(hidden)

    def _target_table(self):
        table = F.normalize(self.embedding.weight, dim=-1)
        return table if self.target_norm == 1.0 else table * self.target_norm

    # -- the clean stream (position wiring) ----------------------------------------------------------------------
    def _encode(self, input_ids, pad, cache: LoopDBCache | None = None):
        """The clean stream over ``input_ids`` (after the cached positions, with ``cache``)."""
        cos, sin, mask = self._cached_positions(input_ids.shape[1], pad, cache, input_ids.device)
        start = 0 if cache is None else cache.length

        def slots(stream, layers):
            return None if cache is None else [cache.slot(stream, index) for index in range(len(layers))]

        if self.config.family == "stacked":
            return self._encode_blocks(input_ids, pad, cache, cos, sin, mask)
        embedded, _ = self._run(self.prelude, self.embedding(input_ids), cos, sin, mask=mask, cache=cache,
                                slots=slots("prelude", self.prelude))
        if self.embedded_norm is not None:
            embedded = self.embedded_norm(embedded)
        clean = {"embedded": embedded, "pad": pad, "length": start + input_ids.shape[1], "cache": cache}
        if self.config.recurrence == "sequence":
            return clean
        clean_cond = self.clean_condition.to(embedded.dtype).expand(input_ids.shape[0], -1)
        hidden, clean["core_kv"] = self._run(self.core, embedded, cos, sin, clean_cond, mask=mask, cache=cache,
                                             slots=slots("core", self.core))
        clean["final_hidden"], clean["coda_kv"] = self._run(self.coda, hidden, cos, sin, mask=mask, cache=cache,
                                                            slots=slots("coda", self.coda))
        return clean

    def _encode_blocks(self, input_ids, pad, cache, cos, sin, mask):
        """Stacked: every block's clean stream from the token embeddings (dense: the blocks chained)."""
        embedded = self.embedding(input_ids)
        hidden, block_kv = embedded, []
        for group, block in enumerate(self.blocks):
            cond = block.clean_condition.to(embedded.dtype).expand(input_ids.shape[0], -1)
            source = hidden if self.config.objective == "dense" else embedded
            slots = None if cache is None else [cache.slot("block", index, group) for index in range(len(block.layers))]
            hidden, kv = self._run(block.layers, source, cos, sin, cond, mask=mask, cache=cache, slots=slots)
            block_kv.append(kv)
        start = 0 if cache is None else cache.length
        return {"embedded": embedded, "pad": pad, "length": start + input_ids.shape[1], "cache": cache,
                "block_kv": block_kv, "final_hidden": hidden}

    def _noisy_positions(self, rows: int, clean, width: int = 1):
        """cos, sin and mask of the noisy rows of the last ``rows`` positions, ``width`` slots each (ordered
        position, slot; slot j at rotary position t + j): clean keys <= own position, and its own slots."""
        length, pad = clean["length"], clean["pad"]
        device = clean["embedded"].device
        anchors = torch.arange(length - rows, length, device=device).repeat_interleave(width)
        slots, keys = torch.arange(width, device=device).repeat(rows), torch.arange(length, device=device)
        itself = anchors[:, None] == anchors[None, :]
        head_dim, context = self.config.d_model // self.config.n_heads, self.config.context + self.config.draft_width - 1
        if pad is None:
            cos, sin = rotary_angles(anchors + slots, head_dim, context)
            return cos, sin, torch.cat([keys[None, :] <= anchors[:, None], itself], dim=1)
        cos, sin = rotary_angles(padded_positions(anchors, pad) + slots, head_dim, context)
        mask = torch.cat([padded_causal_mask(anchors, keys, pad), itself.expand(len(pad), 1, -1, -1)], dim=-1)
        return cos, sin, mask

    def _denoise(self, z, sigma: float, clean, previous=None):
        """Logits of the denoiser at noise level sigma for noisy rows z (B, R, C) (the last R positions), or
        for a drafting model's slots z (B, R, L, C), denoised jointly -> (B, R, L, V)."""
        if z.dim() == 4:
            batch, rows, width = z.shape[:3]
            embedded = clean["embedded"][:, -rows:].repeat_interleave(width, dim=1)
            logits = self._denoise_rows(z.reshape(batch, rows * width, -1), sigma, clean, embedded, previous, width)
            return logits.view(batch, rows, width, -1)
        return self._denoise_rows(z, sigma, clean, clean["embedded"][:, -z.shape[1]:], previous)

    def _denoise_rows(self, z, sigma: float, clean, embedded, previous=None, width: int = 1):
        rows = z.shape[1] // width
        sigma_t = torch.full((z.shape[0],), float(sigma), device=z.device)
        variance = sigma_t**2 + self.sigma_data**2
        c_skip = (self.sigma_data**2 / variance)[:, None, None]
        c_out = (sigma_t * self.sigma_data / variance.sqrt())[:, None, None]
        c_in = (1.0 / variance.sqrt())[:, None, None]
        cos, sin, mask = self._noisy_positions(rows, clean, width)
        if self.config.family == "stacked":  # the block owning sigma is the denoiser
            owner = block_owner(self.config, float(sigma))
            block = self.blocks[owner]
            hidden = inject(block.injection, c_in * z, embedded)
            cond = self.sigma_embedder(torch.log(sigma_t) / 4)
            hidden, _ = self._run(block.layers, hidden, cos, sin, cond, clean["block_kv"][owner], mask)
            return self._logits((c_skip * z + c_out * block.denoiser_out(block.norm(hidden))) / self.target_scale)
        hidden = inject(self.injection, c_in * z, embedded)
        if self.slot_embedding is not None:
            hidden = hidden + self.slot_embedding.repeat(rows, 1).to(hidden.dtype)
        if self.self_condition is not None and previous is not None:
            hidden = hidden + self.self_condition((previous / self.target_scale).to(hidden.dtype))
        cond = self.sigma_embedder(torch.log(sigma_t) / 4)
        hidden, _ = self._run(self.core, hidden, cos, sin, cond, clean["core_kv"], mask)
        denoised = c_skip * z + c_out * self.denoiser_out(self.core_norm(hidden))
        hidden, _ = self._run(self.coda, denoised / self.target_scale, cos, sin, None, clean["coda_kv"], mask)
        logits = self._logits(hidden)
        if not self.config.likelihood_logits:
            return logits
        evidence = z.float() @ self._target_table().detach().float().t() / sigma_t.float()[:, None, None] ** 2
        return logits.float() + evidence

    def _estimate(self, logits, generator, kind: str):
        """Dhat from logits: softmax @ table (soft), or one row of the table (argmax, sample)."""
        table = self._target_table()
        if kind == "soft":
            return torch.softmax(logits.float(), dim=-1).to(table.dtype) @ table
        if kind == "argmax":
            choice = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float(), -1)
            choice = torch.multinomial(probs.flatten(0, -2).cpu(), 1, generator=generator).view(probs.shape[:-1])
        return table[choice.to(logits.device)]

    def _diffusion_loops(self, clean, z, num_loops, generator, states, sampler):
        """The sampler: one loop per grid point (euler, heun or ancestral); the last evaluation's logits."""
        grid, previous, solver = sigma_grid(self.config, num_loops, sampler), None, sampler["solver"]

        def step(state, sigma):
            nonlocal previous
            logits = self._denoise(state, sigma, clean, previous)
            previous = self._estimate(logits, generator, sampler["estimate"]).to(state.dtype)
            return previous, logits

        for index, sigma in enumerate(grid):
            denoised, logits = step(z, sigma)
            if index + 1 == len(grid):
                return logits
            sigma_next = grid[index + 1]
            if solver == "ancestral":
                z = denoised + sigma_next * torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
            else:
                z_euler = z + (sigma_next - sigma) * (z - denoised) / sigma
                if solver == "heun":
                    denoised_next = step(z_euler, sigma_next)[0]
                    slope = 0.5 * ((z - denoised) / sigma + (z_euler - denoised_next) / sigma_next)
                    z_euler = z + (sigma_next - sigma) * slope
                z = z_euler
            states.append(z)
        return logits

    # -- the recurrence (bptt, ouro) ------------------------------------------------------------------------------
    def _recur(self, state, clean):
        """One loop: state (B, T, C) -> next state (unit RMS)."""
        rows = state.shape[1]
        if self.config.recurrence == "sequence":
            cos, sin, mask = self._positions(torch.arange(rows, device=state.device), clean["pad"])
            hidden, _ = self._run(self.core, inject(self.injection, state, clean["embedded"]), cos, sin, mask=mask)
            return self.core_norm(hidden)
        cos, sin, mask = self._noisy_positions(rows, clean)
        hidden = inject(self.injection, state, clean["embedded"][:, -rows:])
        cond = self.clean_condition.to(hidden.dtype).expand(state.shape[0], -1)
        hidden, _ = self._run(self.core, hidden, cos, sin, cond, clean["core_kv"], mask)
        return self.core_norm(hidden)

    def _readout(self, state, clean):
        """Logits from the last state through the coda."""
        rows = state.shape[1]
        if self.config.recurrence == "sequence":
            cos, sin, mask = self._positions(torch.arange(rows, device=state.device), clean["pad"])
            hidden, _ = self._run(self.coda, state, cos, sin, mask=mask)
        else:
            cos, sin, mask = self._noisy_positions(rows, clean)
            hidden, _ = self._run(self.coda, state, cos, sin, None, clean["coda_kv"], mask)
        return self._logits(hidden)

    def _decode_sequence(self, clean, state, num_loops: int, exit_rule: str | None = None, states=None):
        """Generation with sequence recurrence: the new positions of ``clean`` (after the cached ones) run
        up to ``num_loops`` loops from ``state``, loop k attending to loop k of the cached positions
        (with a last-loop cache, ``cache.last_only``, to the cached positions' last loop: Ouro's shortcut);
        then the coda. Returns the logits and extends the cache (``clean["cache"]``). A position that
        exits early keeps its state, and its cache entries for the loops it skips repeat its last
        loop's keys/values (Huginn's KV sharing), so later tokens find an entry at every loop.
        ``states`` (a list) receives the state after each of the ``num_loops`` loops."""
        cache, rows = clean["cache"], state.shape[1]
        cos, sin, mask = self._cached_positions(rows, None, cache, state.device)
        tracker = ExitTracker(exit_rule, state.shape[:2], state.device)
        coda_prefixes = [cache.past(cache.slot("coda", index)) for index in range(len(self.coda))]
        produced = []  # per loop: per layer (k, v) of the new positions
        for loop in range(num_loops):
            group = 0 if cache.last_only else loop
            prefixes = [cache.past(cache.slot("core", index, group)) for index in range(len(self.core))]
            hidden, layer_kv = self._run(self.core, inject(self.injection, state, clean["embedded"]), cos, sin,
                                         prefixes=prefixes, mask=mask)
            new_state = self.core_norm(hidden)
            logits = gate = None
            if tracker.kind == "kl":
                logits = self._logits(self._run(self.coda, new_state, cos, sin, prefixes=coda_prefixes, mask=mask)[0])
            if tracker.kind == "gate":
                gate = torch.sigmoid(self.exit_gate(new_state).squeeze(-1).float())
            active = tracker.active[..., None]
            state, old_state = torch.where(active, new_state, state), state
            if produced:  # an exited position repeats its last keys/values
                layer_kv = [tuple(torch.where(active[:, None], new, old) for new, old in zip(kv, last))
                            for kv, last in zip(layer_kv, produced[-1])]
            produced.append(layer_kv)
            if states is not None:
                states.append(state)
            tracker.update(old_state, state, logits, gate)
            if tracker.kind is not None and not bool(tracker.active.any()):
                break
        if states is not None:  # every position exited: the state stays for the loops left
            states += [state] * (num_loops - len(states))
        produced += [produced[-1]] * (num_loops - len(produced))
        for loop, layer_kv in enumerate(produced[-1:] if cache.last_only else produced):
            for index, kv in enumerate(layer_kv):
                cache.update(*kv, cache.slot("core", index, loop))
        coda_slots = [cache.slot("coda", index) for index in range(len(self.coda))]
        hidden, _ = self._run(self.coda, state, cos, sin, mask=mask, cache=cache, slots=coda_slots)
        return self._logits(hidden), tracker.loops_used

    # -- one draw ------------------------------------------------------------------------------------------------------
    def _initial_state(self, shape, num_loops, generator, device):
        """The state a draw starts from: noise at the top of the grid (diffusion), or N(0, 1) (bptt, ouro)."""
        if self.config.objective == "diffusion" and self.config.draft_width > 1:  # L slots per position
            shape = (*shape[:-1], self.config.draft_width, shape[-1])
        noise = torch.randn(shape, generator=generator).to(device)
        if self.config.objective == "diffusion":
            return noise * math.sqrt(self.sigma_data**2 + self.config.sigma_max**2)
        return noise * self.config.state_std

    def _loop_logits(self, clean, z, num_loops, generator, states, sampler):
        """K loops from state z (None: dense); the last loop's logits; ``states`` receives each loop's state."""
        objective = self.config.objective
        if objective == "dense":
            if self.config.recurrence == "sequence":
                return self._readout(self._recur(torch.zeros_like(clean["embedded"]), clean), clean)
            states.append(clean["final_hidden"])
            return self._logits(clean["final_hidden"])
        if objective == "diffusion" and self.config.joint:
            return joint_loops(self, clean, z, num_loops, generator, states, sampler)
        if objective == "diffusion":
            logits = self._diffusion_loops(clean, z, num_loops, generator, states, sampler)
            return logits[:, :, 0] if logits.dim() == 4 else logits  # drafting: the next token is slot 0
        for _ in range(num_loops):
            z = self._recur(z, clean)
            states.append(z)
        return self._readout(z, clean)

    def _sampler(self, **overrides) -> dict:
        """The diffusion sampler's settings: the config's, with the call's overrides (None: keep)."""
        settings = {key: getattr(self.config, key) for key in SAMPLER_CHOICES}
        for key, value in overrides.items():
            if value is None:
                continue
            if SAMPLER_CHOICES[key] is not None and value not in SAMPLER_CHOICES[key]:
                raise ValueError(f"{key}={value!r}; choose one of {', '.join(SAMPLER_CHOICES[key])}")
            settings[key] = float(value) if key in ("grid_sigma_last", "wavefront") else value
        return settings

    def _draws_along_the_way(self, sampler) -> bool:
        return self.config.objective == "diffusion" and (sampler["solver"] == "ancestral"
                                                         or sampler["estimate"] == "sample")

    def _row_states(self, generators, rows: int, width: int, num_loops: int, pad, device):
        """(B, rows, C) initial states ((B, rows, L, C) drafting); row b's from generators[b], for its real
        (unpadded) positions."""
        if self.config.objective == "dense":
            return None
        starts = [0 if pad is None else int(pad[row]) for row in range(len(generators))]
        draws = [self._initial_state((1, rows - start, width), num_loops, generator, device)[0]
                 for generator, start in zip(generators, starts)]
        state = draws[0].new_zeros(len(generators), rows, *draws[0].shape[1:])
        for row, (draw, start) in enumerate(zip(draws, starts)):
            state[row, start:] = draw
        return state

    # -- transformers API ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                num_loops: int | None = None, noise_seed: int | None = None, readout: str | None = None,
                num_samples: int | None = None, labels: torch.LongTensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, grid: str | None = None,
                solver: str | None = None, grid_sigma_last: float | None = None, estimate: str | None = None,
                wavefront: float | None = None, **unused):
        """Next-token logits at every position after ``num_loops`` loops (config defaults for every None).

        ``attention_mask`` (B, T): left padding (zeros first) is hidden and each row's positions
        start at its first real token. ``readout="predictive"``: log of the mean over ``num_samples``
        draws of the last loop's distribution; ``"draw"``: one draw's raw logits; ``"anchor"`` (a drafting
        model trained with an anchor head): the clean stream's next-token log-probabilities. ``hidden_states``:
        the prelude output, then the state after each loop (of the first draw). ``grid``, ``solver``,
        ``grid_sigma_last``, ``estimate``, ``wavefront`` (sequence-joint): the diffusion sampler's settings for
        this call (default: the config's)."""
        config = self.config
        # int(): lm-eval's --model_args may hand the load-time overrides over as text
        num_loops = int(config.num_loops if num_loops is None else num_loops)
        seed = int(config.noise_seed if noise_seed is None else noise_seed)
        readout = config.readout if readout is None else readout
        samples = int(config.num_samples if num_samples is None else num_samples)
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r}; choose one of {', '.join(READOUTS)}")
        if num_loops < 1 or samples < 1:
            raise ValueError(f"num_loops and num_samples must be >= 1, got {num_loops} and {samples}")
        sampler = self._sampler(grid=grid, solver=solver, grid_sigma_last=grid_sigma_last, estimate=estimate,
                               wavefront=wavefront)
        pad = _left_padding(attention_mask)
        if readout == "anchor":  # a drafting run's dense anchor head: the clean stream's own next-token logits
            if not config.anchor_head:
                raise ValueError("readout='anchor' needs the anchor head of a model trained with anchor_weight > 0")
            clean = self._encode(input_ids, pad)
            logits = torch.log_softmax(self._logits(clean["final_hidden"]).float(), dim=-1)
            return self._output(logits, labels, (clean["embedded"], clean["final_hidden"]) if output_hidden_states else None)
        if config.joint and pad is not None:  # loopdb's sequence-joint model takes no padding: each row alone
            return self._rows_alone(input_ids, pad, labels, num_loops, seed, readout, samples, output_hidden_states,
                                    sampler)
        if self._draws_along_the_way(sampler) and input_ids.shape[0] > 1:  # a row's draws must not depend on the batch
            return self._rows_alone(input_ids, pad, labels, num_loops, seed, readout, samples, output_hidden_states,
                                    sampler)
        clean = joint_encode(self, input_ids, sampler) if config.joint else self._encode(input_ids, pad)
        generators = [torch.Generator().manual_seed(seed) for _ in range(input_ids.shape[0])]
        draws, states = [], []
        for _ in range(1 if readout == "draw" else samples):
            z = self._row_states(generators, input_ids.shape[1], config.d_model, num_loops, pad, input_ids.device)
            logits = self._loop_logits(clean, z, num_loops, generators[0], states if not draws else [], sampler)
            if readout == "draw":
                draws.append(logits)
                break
            draws.append(torch.log_softmax(logits.float(), dim=-1))
            if z is None:  # deterministic: every draw would be the same
                break
        logits = draws[0] if len(draws) == 1 else log_mean_exp(draws)
        hidden = (clean["embedded"], *states) if output_hidden_states else None
        return self._output(logits, labels, hidden)

    def _rows_alone(self, input_ids, pad, labels, num_loops, seed, readout, samples, output_hidden_states, sampler):
        """forward of each row by itself, over its real (unpadded) positions; a padded slot's outputs are zeros."""
        logits, hidden = None, None
        for row in range(input_ids.shape[0]):
            start = 0 if pad is None else int(pad[row])
            alone = self(input_ids[row:row + 1, start:], None, num_loops, seed, readout, samples,
                         output_hidden_states=output_hidden_states, **sampler)
            if logits is None:
                logits = alone.logits.new_zeros(input_ids.shape[0], input_ids.shape[1], alone.logits.shape[-1])
                hidden = [state.new_zeros(input_ids.shape[0], *state.shape[1:]) for state in alone.hidden_states or ()]
            logits[row, start:] = alone.logits[0]
            for states, state in zip(hidden, alone.hidden_states or ()):
                states[row, start:] = state[0]
        return self._output(logits, labels, tuple(hidden) if output_hidden_states else None)

    def _output(self, logits, labels, hidden_states):
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, num_loops: int | None = None,
                 noise_seed: int | None = None, stopping_criteria=None, pad_token_id: int | None = None,
                 eos_token_id: int | list | None = None, generation_config=None, use_cache: bool = True,
                 exit: str | None = None, grid: str | None = None, solver: str | None = None,
                 grid_sigma_last: float | None = None, estimate: str | None = None, wavefront: float | None = None,
                 last_loop_cache: bool | None = None, output_hidden_states: bool | None = None,
                 return_dict_in_generate: bool | None = None, **unused):
        """Batched generation, K = ``num_loops`` loops per new token; returns (B, T + new) token ids.

        Rows may be left-padded (``attention_mask``). The rows of a model with position recurrence (and
        a stacked one) decode together against one cache, as loopdb's ``generate_batch``: a row gives
        what it gives alone until the window fills, then the window slides for all rows at once. Those
        of a sequence-recurrent model decode one after another (each row's tokens as loopdb's). A new token's initial
        state comes from the row's generator seeded by ``noise_seed`` (loopdb's draws), greedy unless
        ``do_sample`` (then ``temperature`` and ``top_k``). A row stops at ``eos_token_id`` or when ``stopping_criteria`` says so (then it is
        filled with ``pad_token_id``). With ``use_cache`` a new token runs against a ``LoopDBCache``
        of the earlier positions, else the window is recomputed (the same tokens, slower); when the
        window is full it slides by half and the cache is rebuilt, as loopdb's generation does.
        ``exit`` (sequence recurrence; default the config's): stop each token's loops early, ``kl:EPS``,
        ``delta:EPS`` or ``gate:Q`` (``self.loops_used`` then holds each new token's loops); ``last_loop_cache``
        (sequence recurrence; default the config's): Ouro's one-set cache of each position's last loop.
        ``grid``, ``solver``, ``grid_sigma_last``, ``estimate``, ``wavefront``: the diffusion sampler's settings.
        ``return_dict_in_generate``: a ``GenerateDecoderOnlyOutput`` whose ``hidden_states`` (with
        ``output_hidden_states``) hold per new token a tuple of (B, 1, C) states of the position it was
        predicted from: its prelude output, then its state after each loop (as ``forward``'s)."""
        settings = generation_config if generation_config is not None else self.generation_config
        num_loops = int(self.config.num_loops if num_loops is None else num_loops)
        seed = int(self.config.noise_seed if noise_seed is None else noise_seed)
        do_sample = bool(getattr(settings, "do_sample", False)) if do_sample is None else bool(do_sample)
        temperature = float(getattr(settings, "temperature", None) or 1.0) if temperature is None else float(temperature)
        top_k = getattr(settings, "top_k", None) if top_k is None else top_k
        eos = getattr(settings, "eos_token_id", None) if eos_token_id is None else eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        pad_token_id = getattr(settings, "pad_token_id", None) if pad_token_id is None else pad_token_id
        if max_new_tokens is None and max_length is None:
            max_new_tokens = getattr(settings, "max_new_tokens", None)
        if max_new_tokens is None:
            limit = max_length if max_length is not None else getattr(settings, "max_length", None) or 20
            max_new_tokens = max(0, limit - input_ids.shape[1])
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        exit = getattr(self.config, "exit", None) if exit is None else exit
        if exit and (self.config.recurrence != "sequence" or self.config.joint):
            raise ValueError("adaptive exit applies to sequence-recurrent models (objective bptt or ouro)")
        ExitTracker(exit, (1,), input_ids.device)  # a bad rule fails here, before any work
        if exit and str(exit).startswith("gate") and getattr(self, "exit_gate", None) is None:
            raise ValueError("exit=gate:Q needs the learned exit gate of a model trained with objective=ouro")
        last_only = bool(self.config.last_loop_cache if last_loop_cache is None else last_loop_cache)
        if last_only and (self.config.recurrence != "sequence" or self.config.joint):
            raise ValueError("the last-loop cache applies to sequence-recurrent models (objective bptt or ouro)")
        sampler = self._sampler(grid=grid, solver=solver, grid_sigma_last=grid_sigma_last, estimate=estimate,
                               wavefront=wavefront)
        pad = _left_padding(attention_mask)
        prompts = [input_ids[row, 0 if pad is None else int(pad[row]):].tolist() for row in range(input_ids.shape[0])]
        if any(not prompt for prompt in prompts):
            raise ValueError("generation needs non-empty prompts (the model predicts the token after each position)")
        if self.config.joint:  # one row after another, each from its own seed (loopdb's rows' tokens)
            streams = _RowStreams([JointRow(self, prompt, seed, num_loops, use_cache, sampler) for prompt in prompts])
        elif self.config.recurrence == "sequence":
            streams = _RowStreams([_RowStream(self, prompt, seed, num_loops, use_cache, exit, last_only)
                                   for prompt in prompts])
        else:
            streams = _BatchStream(self, prompts, seed, num_loops, use_cache, sampler)
        output, done = input_ids, torch.zeros(len(prompts), dtype=torch.bool, device=input_ids.device)
        hidden = []
        for _ in range(max_new_tokens):
            column = streams.next_tokens(temperature if do_sample else 0.0, top_k, done.tolist())
            if output_hidden_states:
                hidden.append(streams.hidden)
            filler = pad_token_id if pad_token_id is not None else 0  # what a stopped row appends
            column = [filler if stop else token for token, stop in zip(column, done.tolist())]
            column = torch.tensor(column, device=input_ids.device)[:, None]
            output = torch.cat([output, column], dim=1)
            done |= torch.tensor([int(token) in eos for token in column[:, 0]], device=done.device)
            if stopping_criteria is not None:
                stop = stopping_criteria(output, None)
                done |= torch.as_tensor(stop, device=done.device).expand(len(prompts)).bool()
            if bool(done.all()):
                break
        self.loops_used = streams.loops_used
        if return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=output, hidden_states=tuple(hidden) if output_hidden_states else None)
        return output
