"""loopdb as a model of EleutherAI's lm-evaluation-harness (``loopdb eval`` is lm_eval_sweep).

The model class ``LoopDBLM`` is registered with the harness as ``loopdb``::

    import loopdb.evaluation.lm_eval_model  # registers "loopdb"
    lm_eval.simple_evaluate(model="loopdb", model_args="run=runs/demo,num_loops=4,samples=4,seed=0",
                            tasks=[...], task_manager=TaskManager(include_path="eval/tasks"))

Model args: ``run`` (run folder), ``num_loops`` (K, default 1), ``samples`` (noise draws of the
readout, default 4), ``readout`` (``predictive`` (default), ``last``, ``elbo``, ``elbo_continuous``, or
``anchor``: the dense anchor head of a run trained with anchor_weight > 0, for scoring AND generation;
see ``scoring.token_logprobs``), ``seed`` (default 0),
``batch_size`` (default 16), ``device`` (``cpu``, ``cuda``, ``auto``; default ``cpu``), ``exit``
(sequence-recurrent runs: an adaptive exit rule for generate_until, e.g. ``kl:5e-4``; loopdb.maths.exit).

How a loopdb model answers the harness (docs/method.md#scoring: the "predictive" readout):

- The model is used ONLY through ``loopdb.runs.folder.load_model`` and ``loopdb.readouts``
  (``predictive_distribution`` for scoring, ``generate`` for generation), so every model
  family the readouts serve (looped DiffusionBlocks, BPTT, dense, ...) runs unchanged.
- Scoring unit: a window of at most ``context + 1`` tokens plus how many of its LAST
  tokens to score. log p(token) = log of the mean over ``samples`` noise draws of the last
  loop's probability (log-mean-exp). A request whose context + continuation is longer
  than the window is left-truncated; a continuation longer than the window is scored in
  several windows (each token once, each with as much left context as fits).
- Noise: each window's noise comes from its own generator, seeded by (seed, sha256 of the
  window's INPUT tokens, i.e. all but its last token: what the model reads). Results
  therefore do not depend on batch composition or order, and batched and unbatched runs
  agree (to float rounding: rows of a batch are right-padded, which a causal model never
  lets earlier positions see). The scored token itself never picks the noise, so the
  candidates of a multiple-choice question with one-token answers are scored under the
  same noise draws, and the same input always gets the same noise, in every task. A sampler
  that draws along the way (ancestral steps, sampled estimates) uses the row's generator too
  (``scoring.predictive_distribution`` then scores the rows one at a time).
- ``is_greedy``: every continuation token is the argmax of the predictive distribution
  (the mean over the noise draws), whatever the readout: the bounds (``elbo``) score only
  the observed token, so they have no argmax of their own.
- Other readouts (``readout=last|elbo|elbo_continuous``) replace the log-likelihood of
  each scored token with ``scoring.token_logprobs`` under that readout, one window at a
  time, with a generator seeded like the predictive one.
- Document start: the loopdb tokenizer puts no BOS/EOS in the text stream, so the
  newline piece (``Tokenizer.newline_id``) is ``prefix_token_id`` and ``eot_token_id``: it is
  the token an empty context is conditioned on and the first input of a rolling window; a run
  trained with ``start_token`` (a reasoning task whose sequences open with it) gets it before
  every context.
  It is NOT a stop token: generation stops only at the task's ``until`` strings or
  ``max_gen_toks``.
- ``loglikelihood_rolling``: the harness's disjoint rolling windows with context_len 1,
  i.e. the same windows as ``loopdb score`` (a window of T+1 tokens predicts its last T)
  after a newline prefix; each token is scored once.
- ``generate_until``: ``generation.generate`` (the cached generation), greedy unless the
  task sets ``do_sample: true`` (then ``temperature``, default 1, and ``top_k``). Greedy
  means the argmax of the last loop's logits for one noise draw, the token the sampler
  commits to. Tokens are produced in chunks of min(GEN_CHUNK, context // 4) tokens; after
  each chunk the text is checked for the stop strings (early stop). Each chunk's prompt is
  left-truncated to ``context - chunk`` tokens so the chunk fits in the window (no sliding
  inside a chunk) and is seeded by (seed, sha256 of that prompt), so the output does not
  depend on the batch or the order.
"""

from __future__ import annotations

import hashlib
import logging

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # `loopdb eval` reports this in one line
    raise ImportError(
        f"EleutherAI's lm-evaluation-harness is not available ({error}); install it with pip install -e \".[eval]\""
    ) from error

import numpy as np
import torch

from ..data.tokenizers import opened_prompt
from ..device import resolve_device
from ..errors import EvalError, UsageError
from ..maths.exit import parse_exit
from ..names import READOUTS
from ..readouts import generation, scoring
from ..sampling import anchor_sampler

GEN_CHUNK = 16
DEFAULT_MAX_GEN_TOKS = 256


def window_seed(seed: int, tokens) -> int:
    """Seed of the noise generator for model inputs ``tokens`` (a scoring window without its last
    token, or a generation prompt): stable across processes, machines and batch layouts."""
    digest = hashlib.sha256(np.asarray(list(tokens), dtype="<i8").tobytes() + int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest()[:8], "little") % (2**63)


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"{name}={value!r}: expected a positive integer") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise EvalError(f"{name}={value!r}: expected a positive integer")
    return number


@register_model("loopdb")
class LoopDBLM(TemplateLM):
    """A loopdb run folder as an lm-eval language model at a chosen loop count.

    Either ``run`` (a run folder: the model comes from ``loopdb.runs.folder.load_model``, the
    tokenizer from the run's data folder) or, from Python, an already built ``model`` and
    ``tokenizer`` (a ``loopdb.data.tokenizers.Tokenizer``).
    """

    MODEL_ARGS = ("run", "num_loops", "samples", "readout", "seed", "batch_size", "device", "exit")

    def __init__(self, run=None, num_loops=1, samples=4, readout="predictive", seed=0, batch_size=16,
                 device="cpu", max_batch_size=None, model=None, tokenizer=None, exit=None, **unknown):
        if unknown:  # model_args="run=...,loop=4" would otherwise be a TypeError deep in the harness
            raise EvalError(f"unknown loopdb model arg(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(self.MODEL_ARGS)}")
        super().__init__()
        try:
            self.exit_rule = parse_exit(exit)  # generate_until of sequence-recurrent runs: stop each token early
        except UsageError as error:
            raise EvalError(str(error).replace("--exit", "exit")) from None
        self.generation_loops = []  # loops each generated token used (mean_loops of the report)
        if readout not in READOUTS:
            raise EvalError(f"readout={readout!r} is not available; choose one of {', '.join(READOUTS)} (docs/method.md#scoring)")
        self.readout = readout
        self.num_loops = num_loops
        self.samples = _positive_int("samples", samples)
        self.seed = int(seed)
        self.batch_size = 16 if batch_size in (None, "auto") else _positive_int("batch_size", batch_size)
        self._device = resolve_device(device)
        if model is None:
            if run is None:
                raise EvalError("the loopdb model needs run=PATH (a run folder made by `loopdb train`)")
            from ..data.storage import load_tokenizer
            from ..runs.folder import load_model, run_data_dir

            model, _ = load_model(run, self._device)
            tokenizer = load_tokenizer(run_data_dir(run))
        elif tokenizer is None:
            raise ValueError("pass the tokenizer along with an in-memory model")
        self.run = None if run is None else str(run)
        # anchor: the dense anchor head answers everything (scores, greediness, generation); else the model's sampler
        self.sampler = anchor_sampler(model) if readout == "anchor" else None
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        vocab = getattr(model.config, "vocab_size", tokenizer.vocab_size)
        if tokenizer.vocab_size != vocab:
            raise EvalError(f"tokenizer has {tokenizer.vocab_size} pieces but the model {vocab}; "
                             "the run's data.json points at the wrong data folder")
        self.window = int(model.config.context)

    # -- settings -----------------------------------------------------------------------------------
    @property
    def num_loops(self) -> int:
        return self._num_loops

    @num_loops.setter
    def num_loops(self, value) -> None:
        self._num_loops = _positive_int("num_loops", value)

    @property
    def eot_token_id(self) -> int:
        return self.tok.newline_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.newline_id

    @property
    def max_length(self) -> int:
        return self.window

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"loopdb-sentencepiece-{self.tok.vocab_size}"

    def get_model_info(self) -> dict:
        return {"loopdb_run": self.run, "num_loops": self.num_loops, "samples": self.samples,
                "readout": self.readout, "seed": self.seed, "context": self.window,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def opened(self, context) -> list[int]:
        return opened_prompt(context, self.prefix_token_id, getattr(self.model.config, "start_token", False))

    # -- scoring ------------------------------------------------------------------------------------
    def windows_for(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], int]]:
        """Scoring units of a request: (window of <= T+1 tokens, number of its last tokens to score).

        One window when the continuation fits (left-truncated context), else consecutive
        windows that score T continuation tokens each with the T tokens before them as context.
        """
        context = self.opened(context)
        full = context + list(continuation)
        units, first = [], len(context)
        while first < len(full):
            end = min(first + self.window, len(full))
            units.append((full[max(0, end - self.window - 1):end], end - first))
            first = end
        return units

    def score_windows(self, units: list[tuple[list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p, every token greedy) of the scored tokens of each (window, count) unit."""
        from tqdm import tqdm

        collator = Collator(units, sort_fn=lambda unit: (-len(unit[0]), tuple(unit[0])))
        results = []
        batches = collator.get_batched(n=self.batch_size)
        progress = tqdm(total=len(units), desc=f"loopdb K={self.num_loops}", disable=disable_tqdm)
        for batch in batches:
            lengths = [len(tokens) - 1 for tokens, _ in batch]
            width = max(lengths)
            inputs = torch.full((len(batch), width), self.prefix_token_id, dtype=torch.long)
            for row, (tokens, _) in enumerate(batch):
                inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
            generators = [torch.Generator().manual_seed(window_seed(self.seed, tokens[:-1])) for tokens, _ in batch]
            logprobs = scoring.predictive_distribution(self.model, inputs.to(self._device), self.num_loops,
                                                      self.samples, generators, lengths, self.sampler).cpu()
            for row, (tokens, count) in enumerate(batch):
                length = len(tokens) - 1
                targets = torch.tensor(tokens[-count:], dtype=torch.long)
                scored = logprobs[row, length - count:length]
                picked = scored.gather(-1, targets[:, None]).squeeze(-1)
                if self.readout not in ("predictive", "anchor"):  # anchor: self.sampler above is the anchor head
                    picked = self.readout_logprobs(tokens)[-count:]
                results.append((float(picked.double().sum()), bool((scored.argmax(-1) == targets).all())))
            progress.update(len(batch))
        progress.close()
        return collator.get_original(results)

    def readout_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """log p of each of the window's next tokens under ``self.readout``; (len(tokens) - 1,)."""
        window = torch.tensor(tokens, dtype=torch.long, device=self._device)[None]
        generator = torch.Generator().manual_seed(window_seed(self.seed, tokens[:-1]))
        try:
            return scoring.token_logprobs(self.model, window, self.num_loops, self.readout, self.samples,
                                         generator)[0].double().cpu()
        except ValueError as error:  # e.g. the ELBO of a model that is not a diffusion model
            raise ValueError(f"readout={self.readout}: {error}") from None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        units, owners = [], []
        for index, (_, context, continuation) in enumerate(requests):
            for unit in self.windows_for(context, continuation):
                units.append(unit)
                owners.append(index)
        scores = self.score_windows(units, disable_tqdm=disable_tqdm)
        totals = [[0.0, True] for _ in requests]
        for owner, (logprob, greedy) in zip(owners, scores):
            totals[owner][0] += logprob
            totals[owner][1] = totals[owner][1] and greedy
        answers = [(logprob, greedy) for logprob, greedy in totals]
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """The harness's disjoint rolling windows (context_len 1) of a document, as scoring units."""
        pairs = get_rolling_token_windows(token_list=list(tokens), prefix_token=self.prefix_token_id,
                                          max_seq_len=self.window, context_len=1)
        return [((context + continuation)[-(self.window + 1):], len(continuation))
                for context, continuation in map(make_disjoint_window, pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        units, owners = [], []
        for index, request in enumerate(requests):
            for unit in self.rolling_windows(self.tok_encode(request.args[0])):
                units.append(unit)
                owners.append(index)
        scores = self.score_windows(units, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, int | None]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:
            temperature = 0.0
        top_k = kwargs.pop("top_k", None)
        top_k = int(top_k) if top_k else None
        if kwargs:
            logging.getLogger(__name__).warning("loopdb ignores generation kwargs %s", sorted(kwargs))
        return until, max_gen_toks, temperature, top_k

    def generate_tokens(self, context: str, until: list[str], max_gen_toks: int, temperature: float = 0.0,
                        top_k: int | None = None) -> tuple[list[int], str]:
        """(new token ids, their text cut before the first stop string) for one context."""
        return self.generate_tokens_batch([context], [until], [max_gen_toks], temperature, top_k)[0]

    def generate_tokens_batch(self, contexts: list[str], untils: list[list[str]], max_gen_toks: list[int],
                              temperature: float = 0.0, top_k: int | None = None) -> list[tuple[list[int], str]]:
        """Per context, (new token ids, their text cut before the first stop string). Generation runs
        in chunks (see the module docstring), all unfinished rows as one left-padded batch
        (generation.generate_batch); a row ends after the chunk where a stop string appears, or at
        its max_gen_toks. Each row gives what it gives alone: its chunks, prompts and seeds do not
        depend on the other rows, and a row that needs fewer tokens of a chunk keeps a prefix."""
        prompts = [self.opened(self.tok_encode(context)) for context in contexts]
        chunk = max(1, min(GEN_CHUNK, self.window // 4))
        new: list[list[int]] = [[] for _ in contexts]
        texts = [""] * len(contexts)
        active = [row for row in range(len(contexts)) if max_gen_toks[row] > 0]
        while active:
            counts = [min(chunk, max_gen_toks[row] - len(new[row])) for row in active]
            # left-truncate so a whole chunk fits in the window: every new token sees at least
            # window - chunk tokens of context and generation never has to slide. The prompt
            # does not depend on count, so a shorter run is a prefix of a longer one.
            so_far = [(prompts[row] + new[row])[-max(1, self.window - chunk):] for row in active]
            seeds = [window_seed(self.seed, tokens) for tokens in so_far]
            if self.exit_rule is None:
                generated = generation.generate_batch(self.model, so_far, max(counts), self.num_loops,
                                                      temperature=temperature, top_k=top_k, seeds=seeds,
                                                      sampler=self.sampler)
            else:  # adaptive exit (sequence-recurrent runs): row by row, each reporting the loops it used
                generated = []
                for tokens, seed in zip(so_far, seeds):
                    stats = {}
                    generated.append(generation.generate(self.model, tokens, max(counts), self.num_loops,
                                                         temperature=temperature, top_k=top_k, seed=seed,
                                                         exit_rule=self.exit_rule, stats=stats, sampler=self.sampler))
                    self.generation_loops.append(stats["mean_loops"])
            still = []
            for row, count, tokens in zip(active, counts, generated):
                new[row] += tokens[:count]
                texts[row] = self.tok_decode(new[row])
                stopped = any(stop and stop in texts[row] for stop in untils[row])
                if not stopped and len(new[row]) < max_gen_toks[row]:
                    still.append(row)
            active = still
        results = []
        for row, text in enumerate(texts):
            cuts = [text.find(stop) for stop in untils[row] if stop and stop in text]
            results.append((new[row], text[:min(cuts)] if cuts else text))
        return results

    def generate_text(self, context: str, until: list[str], max_gen_toks: int, temperature: float = 0.0,
                      top_k: int | None = None) -> str:
        """Continue ``context`` until a stop string (cut off, not returned) or ``max_gen_toks`` tokens."""
        return self.generate_tokens(context, until, max_gen_toks, temperature, top_k)[1]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same sampling settings run ``batch_size`` at a time (batched generation)."""
        from tqdm import tqdm

        settings = [self._generation_settings(request.args[1]) for request in requests]
        answers: list[str | None] = [None] * len(requests)
        groups: dict = {}
        for index, (until, max_gen_toks, temperature, top_k) in enumerate(settings):
            groups.setdefault((temperature, top_k), []).append(index)
        bar = tqdm(total=len(requests), desc=f"loopdb generate K={self.num_loops}", disable=disable_tqdm)
        for (temperature, top_k), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                results = self.generate_tokens_batch([requests[i].args[0] for i in batch],
                                                     [settings[i][0] for i in batch], [settings[i][1] for i in batch],
                                                     temperature, top_k)
                for index, (_, answer) in zip(batch, results):
                    self.cache_hook.add_partial("generate_until", requests[index].args, answer)
                    answers[index] = answer
                bar.update(len(batch))
        bar.close()
        return answers

