"""`loopdb score` and `loopdb sample` for the next-token language models (families looped, stacked)."""

from __future__ import annotations

import json

import torch
from tqdm import tqdm

from .. import data as data_lib
from ..device import resolve_device
from ..errors import UsageError
from ..readouts import generation
from ..readouts.scoring import bits_per_byte
from ..runs.folder import load_model, run_data_dir
from .args import parse_loops


def score(args, sampler) -> int:
    """`loopdb score` of a next-token LM: bits per byte per loop count under a readout."""
    if args.readout == "block_elbo":  # a drafting run's bound on whole blocks (loopdb.cli.drafting)
        from .drafting import score_block_elbo

        return score_block_elbo(args, sampler)
    loops = parse_loops(args.loops or "1,4,16")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: need at least one noise draw")
    device = resolve_device(args.device)
    model, config = load_model(args.run, device, sampler)
    data_dir = run_data_dir(args.run)
    tokens = data_lib.load_tokens(data_dir, args.split)
    token_bytes = torch.as_tensor(data_lib.load_tokenizer(data_dir).token_bytes)
    windows = data_lib.eval_windows(tokens, config.model.context, args.max_windows)
    results = {}
    for num_loops in loops:
        with tqdm(total=len(windows), desc=f"score K={num_loops}", disable=args.json or args.quiet,
                  leave=False) as bar:
            try:
                results[str(num_loops)] = bits_per_byte(
                    model, windows, token_bytes, num_loops, samples=args.samples, seed=args.seed,
                    batch_size=args.batch_size, device=device, progress=bar, readout=args.readout)
            except ValueError as error:  # e.g. the ELBO of a model that is not a diffusion model
                raise UsageError(str(error)) from None
    meta = data_lib.load_meta(data_dir)
    report = {"bpb": results, "readout": args.readout, "samples": args.samples, "split": args.split,
              "seed": args.seed, "windows": len(windows), "unigram_bpb": meta["unigram_test_bpb"]}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.split} bits per byte ({args.readout}, {args.samples} noise draw(s), {len(windows)} windows):")
        for num_loops, value in results.items():
            print(f"  K={num_loops:>3}  {value:.4f}")
        print(f"  unigram (test) {meta['unigram_test_bpb']:.4f}")
    return 0


def sample(args, sampler) -> int:
    """`loopdb sample` of a next-token LM: K loops per new token."""
    if getattr(args, "speculative", False) or getattr(args, "parallel", False):  # drafting runs (loopdb.cli.drafting)
        from .drafting import sample_drafts

        return sample_drafts(args, sampler)
    if args.loops is not None and args.loops < 1:
        raise UsageError(f"--loops {args.loops}: the loop count must be >= 1")
    model, config = load_model(args.run, resolve_device(args.device), sampler)
    if args.loops is None:
        args.loops = config.model.num_blocks if config.model.family == "stacked" else 4
    tokenizer = data_lib.load_tokenizer(run_data_dir(args.run))
    prompt = tokenizer.encode(args.prompt or "\n")
    new_tokens = 100 if args.max_new_tokens is None else args.max_new_tokens
    ids = generation.generate(model, prompt, new_tokens, args.loops, temperature=args.temperature,
                          top_k=args.top_k or None, seed=args.seed)
    print(args.prompt + tokenizer.decode(ids))
    return 0
