"""CLI bodies for drafting runs (draft width L > 1, anchor head):
`loopdb score --readout block_elbo` and `loopdb sample --speculative | --parallel`
(`loopdb bench decode` is loopdb.cli.bench.decode)."""

from __future__ import annotations

import json
import sys

import torch

from ..data.storage import load_tokenizer, load_tokens
from ..data.windows import eval_windows
from ..device import resolve_device
from ..errors import UsageError
from ..readouts import drafting
from ..runs.folder import load_model, run_data_dir
from .args import parse_loops


def score_block_elbo(args, sampler) -> int:
    """Block ELBO bits per byte per K, and the anchor head's exact AR bits per byte of the same tokens."""
    loops = parse_loops(args.loops or "1,2,4,8,16")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: need at least one noise draw")
    device = resolve_device(args.device)
    model, config = load_model(args.run, device, sampler)
    data_dir = run_data_dir(args.run)
    windows = eval_windows(load_tokens(data_dir, args.split), config.model.context,
                           args.max_windows)
    token_bytes = torch.as_tensor(load_tokenizer(data_dir).token_bytes)
    try:
        result = drafting.block_elbo_bits_per_byte(model, windows, token_bytes, loops, samples=args.samples,
                                                   seed=args.seed, batch_size=args.batch_size, device=device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    report = {"block_elbo_bpb": {str(k): v for k, v in result["block_elbo"].items()},
              "anchor_bpb": result["anchor"], "draft_width": result["draft_width"], "blocks": result["blocks"],
              "readout": "block_elbo", "samples": args.samples, "split": args.split, "seed": args.seed,
              "windows": len(windows), "grid_sigma_last": config.diffusion.grid_sigma_last}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.split} block ELBO bits per byte (L={result['draft_width']}, {result['blocks']} blocks, "
              f"{args.samples} noise draw(s)):")
        for num_loops, value in result["block_elbo"].items():
            print(f"  K={num_loops:>3}  {value:.4f}")
        print(f"  anchor head, exact autoregressive NLL of the same tokens: {result['anchor']:.4f}")
    return 0


def sample_drafts(args, sampler) -> int:
    """`loopdb sample --speculative` (anchor greedy, drafted with K loops) or `--parallel` (L tokens per K loops)."""
    loops = 4 if args.loops is None else args.loops
    if loops < 1:
        raise UsageError(f"--loops {loops}: the loop count must be >= 1")
    model, _ = load_model(args.run, resolve_device(args.device), sampler)
    tokenizer = load_tokenizer(run_data_dir(args.run))
    prompt = tokenizer.encode(args.prompt or "\n")
    new_tokens = 100 if args.max_new_tokens is None else args.max_new_tokens
    try:
        if args.speculative:
            ids, stats = drafting.speculative_generate(model, prompt, new_tokens, loops, seed=args.seed)
            accepted = sum(stats["accepted"]) / max(1, stats["verifications"])
            note = f"{stats['verifications']} verifications, {accepted:.2f} drafts accepted per verification"
        else:
            ids = drafting.parallel_generate(model, prompt, new_tokens, loops, temperature=args.temperature,
                                             top_k=args.top_k or None, seed=args.seed)
            note = f"{len(ids)} tokens, {model.draft_width} per {loops} loop(s)"
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(args.prompt + tokenizer.decode(ids))
    print(f"[loopdb] {'speculative' if args.speculative else 'parallel'} K={loops}: {note}", file=sys.stderr)
    return 0
