"""Configuration of an exported loopdb language model (written next to the weights by `loopdb export`).

Self-contained: imports transformers only, so the export loads where loopdb is not installed.
Every field but the inference defaults (``num_loops``, ``noise_seed``, ``readout``, ``num_samples``,
``exit``, ``last_loop_cache`` and the sampler's settings) is fixed by training; the inference defaults
can be overridden at load time, e.g. ``from_pretrained(DIR, trust_remote_code=True, num_loops=8)``.
"""

from transformers import PretrainedConfig


class LoopDBConfig(PretrainedConfig):
    model_type = "loopdb"

    def __init__(self, family="looped", vocab_size=4096, context=128, d_model=192, n_heads=6, n_prelude=1, n_core=2, n_coda=1,
                 n_layers=8, num_blocks=4, partition="equiprob",
                 mlp_ratio=4.0, injection="concat", tie_head=True, recurrence="position", sandwich_norm=False, state_std=1.0,
                 embedded_norm=False,
                 exit_gate=False, objective="diffusion", sigma_data=0.0, target_norm=1.0, p_mean=-1.2, p_std=1.2,
                 sigma_min=0.002, sigma_max=80.0, grid="equiprob", grid_sigma_last=0.0, solver="euler",
                 estimate="soft", self_condition=False, likelihood_logits=False, draft_width=1, anchor_head=False,
                 known_prefix=True, wavefront=0.0, prompt_openers=None, state_input="unit",
                 num_loops=4, noise_seed=0,
                 readout="predictive", num_samples=4, exit=None, last_loop_cache=False, **kwargs):
        # the architecture (loopdb's ModelConfig). family looped: prelude, core looped K times, coda;
        # recurrence position (a loop sees the clean stream only) or sequence (a loop attends over every
        # earlier position's state: Huginn, Ouro). family stacked: n_layers distinct layers in num_blocks
        # DiffusionBlocks, each the denoiser of its own noise range (``partition``)
        self.family, self.n_layers, self.num_blocks, self.partition = family, n_layers, num_blocks, partition
        self.vocab_size, self.context, self.d_model, self.n_heads = vocab_size, context, d_model, n_heads
        self.n_prelude, self.n_core, self.n_coda, self.mlp_ratio = n_prelude, n_core, n_coda, mlp_ratio
        self.injection, self.tie_head, self.recurrence = injection, tie_head, recurrence
        self.sandwich_norm, self.exit_gate, self.objective = sandwich_norm, exit_gate, objective
        self.state_std = state_std  # bptt, ouro: std of the random initial state
        self.embedded_norm = embedded_norm  # sequence recurrence: unit-RMS prelude output before the injection
        # the diffusion denoiser and its sampler (loopdb's DiffusionConfig)
        self.sigma_data, self.target_norm, self.p_mean, self.p_std = sigma_data, target_norm, p_mean, p_std
        self.sigma_min, self.sigma_max, self.grid, self.grid_sigma_last = sigma_min, sigma_max, grid, grid_sigma_last
        self.solver, self.estimate = solver, estimate
        self.self_condition, self.likelihood_logits = self_condition, likelihood_logits
        # drafting: the noisy slots per position (slot j predicts token t+1+j; the next token is slot 0), and
        # whether the clean stream's next-token logits were trained (readout="anchor")
        self.draft_width, self.anchor_head = draft_width, anchor_head
        # sequence-joint DiffusionBlocks (objective diffusion with sequence recurrence): ``known_prefix``
        # (a text LM: every position but the newest has a known target, the token after it), and the
        # wavefront width of the sampler across positions (0: one sigma for all; also a call argument)
        self.known_prefix, self.wavefront = known_prefix, wavefront
        # how the core reads a noisy state z: "unit" (c_in z) or "wiener" (c_skip z / sigma_data)
        self.state_input = state_input
        # a reasoning task trained with clean_prompt: the token ids that end its prompt ([] or None: off)
        self.prompt_openers = list(prompt_openers or [])
        # inference defaults, each also an argument of forward() and generate()
        self.num_loops, self.noise_seed, self.readout, self.num_samples = num_loops, noise_seed, readout, num_samples
        self.exit = exit  # generate with sequence recurrence: an adaptive exit rule, e.g. "kl:5e-4"
        self.last_loop_cache = last_loop_cache  # generate with sequence recurrence: Ouro's one-set cache
        # transformers' generic names for the same numbers (lm-eval reads max_position_embeddings)
        self.hidden_size, self.num_attention_heads = d_model, n_heads
        self.num_hidden_layers = n_layers if family == "stacked" else n_prelude + n_core + n_coda
        self.max_position_embeddings = context
        kwargs.setdefault("tie_word_embeddings", False)  # a tied head reads the embedding table itself
        super().__init__(**kwargs)

    @property
    def joint(self) -> bool:
        """Sequence-joint DiffusionBlocks: the loop denoises every position's state at once, a sigma per position."""
        return self.family == "looped" and self.recurrence == "sequence" and self.objective == "diffusion"
