"""`loopdb score` and `loopdb sample` for the masked diffusion LM (family mdm)."""

from __future__ import annotations

import json
import math

import torch
from tqdm import tqdm

from ..data.storage import load_meta, load_tokenizer, load_tokens
from ..data.windows import eval_windows
from ..device import resolve_device
from ..errors import UsageError
from ..readouts.masked import ELBO_T_SAMPLES, SAMPLE_STEPS, elbo_bits_per_byte, sample_masked
from ..runs.folder import load_model, run_data_dir


def _load_masked_run(args, sampler, flag: str, count: int):
    """(model, config, data_dir, tokenizer, device) of an mdm run for `loopdb score` / `loopdb sample`,
    after checking the command's ``count`` (t draws or sampler steps, given as ``flag``) is >= 1."""
    if count < 1:
        raise UsageError(f"{flag} {count}: must be >= 1")
    if sampler:
        raise UsageError(f"a masked diffusion run has no sampler settings to override ({', '.join(sampler)}); "
                         "use --steps, --temperature or --top-k")
    device = resolve_device(args.device)
    model, config = load_model(args.run, device)
    data_dir = run_data_dir(args.run)
    return model, config, data_dir, load_tokenizer(data_dir), device


def score(args, sampler) -> int:
    """`loopdb score` of an mdm run: the ELBO in bits per byte (and per character) on a split."""
    t_samples = ELBO_T_SAMPLES if args.t_samples is None else args.t_samples
    model, config, data_dir, tokenizer, device = _load_masked_run(args, sampler, "--t-samples", t_samples)
    tokens = load_tokens(data_dir, args.split)
    windows = eval_windows(tokens, config.model.context, args.max_windows, overlap=0)
    with tqdm(total=len(windows), desc="score ELBO", disable=args.json or args.quiet, leave=False) as bar:
        result = elbo_bits_per_byte(model, windows, torch.as_tensor(tokenizer.token_bytes), t_samples,
                                           args.seed, args.batch_size, device, progress=bar)
    characters = sum(len(tokenizer.decode(window)) for window in windows)
    bits = result["nats"] / math.log(2)
    report = {"bpb": {"elbo": result["bpb"]}, "bpc": {"elbo": bits / max(characters, 1)}, "readout": "elbo",
              "t_samples": t_samples, "objective": config.train.objective,
              "num_blocks": config.model.num_blocks, "split": args.split, "seed": args.seed,
              "windows": len(windows), "tokens": result["tokens"], "bytes": result["bytes"],
              "characters": characters, "unigram_bpb": load_meta(data_dir)["unigram_test_bpb"]}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.split} ELBO ({t_samples} t draws per window, {len(windows)} windows, "
              f"objective {config.train.objective}):")
        print(f"  bits per byte {report['bpb']['elbo']:.4f}   bits per character {report['bpc']['elbo']:.4f}")
        print(f"  unigram (test) {report['unigram_bpb']:.4f} bits per byte")
    return 0


def sample(args, sampler) -> int:
    """`loopdb sample` of an mdm run: --steps ancestral unmasking steps after the prompt."""
    steps = SAMPLE_STEPS if args.loops is None else args.loops
    model, config, _, tokenizer, _ = _load_masked_run(args, sampler, "--steps", steps)
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    new_tokens = config.model.context - len(prompt) if args.max_new_tokens is None else args.max_new_tokens
    if new_tokens < 1 or len(prompt) + new_tokens > config.model.context:
        raise UsageError(f"--max-new-tokens {new_tokens}: a prompt of {len(prompt)} tokens and at least one new "
                         f"token must fit the model's {config.model.context}-token window")
    ids = sample_masked(model, len(prompt) + new_tokens, steps, prompt, temperature=args.temperature,
                        top_k=args.top_k or None, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(ids[0]))
    return 0
