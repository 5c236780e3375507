"""``loopdb bench prepare``: throughput and peak memory of a streaming `loopdb prepare` of a
generated corpus larger than a laptop would like to hold (default 1,000 MB).

The corpus is words drawn from a seeded 30,000-word vocabulary (Zipf-like frequencies, 12
words a line), written as ``DOCUMENTS`` files: fast to generate, the same bytes for the same
seed. The preparation runs in its OWN process (``python -m loopdb.evaluation.prepare_bench``),
so the peaks are its own: ``main_peak_mb`` is that process's resident-set high-water mark
(``ru_maxrss``), ``worker_peak_mb`` the largest of its encoding workers' (``RUSAGE_CHILDREN``),
and ``peak_bound_mb`` = main + workers x largest worker, an upper bound of the whole tree's
peak (the processes' peaks need not coincide). ``mb_per_s`` is corpus MB (10**6 bytes) over
the preparation's wall time; the phases' seconds come from ``prepare(timings=...)``.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = 30_000
WORDS_PER_LINE = 12
DOCUMENTS = 20
BLOCK_BYTES = 16_000_000  # generated at a time (the generator's own memory)


def _vocabulary(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(padded word bytes + b' ' as a (WORDS, 11) uint8 matrix, lengths incl. the space, probabilities)."""
    lengths = rng.integers(1, 10, WORDS)
    letters = rng.integers(ord("a"), ord("z") + 1, (WORDS, 11)).astype(np.uint8)
    letters[np.arange(WORDS), lengths] = ord(" ")
    probabilities = 1.0 / (np.arange(WORDS) + 10.0)
    return letters, lengths + 1, probabilities / probabilities.sum()


def generate_corpus(folder, size_mb: float, seed: int = 0) -> int:
    """Write about size_mb MB of word lines into DOCUMENTS files under folder; returns the bytes written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters, lengths, probabilities = _vocabulary(rng)
    per_document, written = int(size_mb * 1e6) // DOCUMENTS, 0
    mean_length = float((lengths * probabilities).sum())
    for document in range(DOCUMENTS):
        with open(folder / f"words{document:03d}.txt", "wb") as f:
            left = per_document
            while left > 0:
                lines = max(1, int(min(left, BLOCK_BYTES) / mean_length) // WORDS_PER_LINE)
                count = lines * WORDS_PER_LINE
                words = rng.choice(WORDS, size=count, p=probabilities)
                keep = np.arange(letters.shape[1]) < lengths[words][:, None]  # (count, 11): the word and its space
                text = letters[words][keep]
                ends = np.cumsum(lengths[words]) - 1  # the space after each word
                text[ends[WORDS_PER_LINE - 1::WORDS_PER_LINE]] = ord("\n")
                f.write(text[:left].tobytes() if len(text) > left else text.tobytes())
                left -= len(text)
            f.write(b"\n")  # the last block may be cut inside a line
        written += (folder / f"words{document:03d}.txt").stat().st_size
    return written


def measure(corpus: str, out: str, workers: int, vocab_size: int) -> dict:
    """Prepare the corpus in THIS process; its numbers (see the module docstring)."""
    from ..data.preparation import prepare
    from ..data.storage import SPLITS

    timings: dict = {}
    started = time.perf_counter()
    meta = prepare(out, corpus=[corpus], vocab_size=vocab_size, show_progress=False, workers=workers,
                   timings=timings)
    seconds = time.perf_counter() - started
    corpus_bytes = sum(meta["splits"][s]["bytes"] for s in SPLITS)
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"corpus_mb": round(corpus_bytes / 1e6, 1), "seconds": round(seconds, 1),
            "mb_per_s": round(corpus_bytes / 1e6 / seconds, 2), "workers": workers,
            "phases_s": {key: round(value, 1) for key, value in timings.items()},
            "main_peak_mb": round(main_peak, 1), "worker_peak_mb": round(worker_peak, 1),
            "peak_bound_mb": round(main_peak + workers * worker_peak, 1), "measure": "ru_maxrss",
            "tokens": {s: meta["splits"][s]["tokens"] for s in SPLITS},
            "shards": {s: len(meta["splits"][s]["shards"]) for s in SPLITS},
            "tokenizer_sample_mb": round(meta["tokenizer_sample"]["bytes"] / 1e6, 1), "vocab_size": vocab_size}


def run_prepare_bench(size_mb: float = 1000, workers: int | None = None, folder=None, vocab_size: int = 4096,
                      seed: int = 0) -> dict:
    """Generate the corpus in folder (default: a temporary one, removed after), prepare it in a
    subprocess, and return its numbers plus the generation time."""
    from ..data.preparation import DEFAULT_WORKERS

    workers = workers or DEFAULT_WORKERS
    scratch = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="loopdb-bench-prepare-"))
    try:
        started = time.perf_counter()
        generate_corpus(scratch / "corpus", size_mb, seed)
        generated = time.perf_counter() - started
        shutil.rmtree(scratch / "prepared", ignore_errors=True)
        output = subprocess.run([sys.executable, "-m", "loopdb.evaluation.prepare_bench", str(scratch / "corpus"),
                                 str(scratch / "prepared"), str(workers), str(vocab_size)],
                                check=True, capture_output=True, text=True).stdout
        report = json.loads(output.strip().splitlines()[-1])
        report["generate_seconds"] = round(generated, 1)
        return report
    finally:
        if not folder:
            shutil.rmtree(scratch, ignore_errors=True)


def format_report(report: dict) -> str:
    phases = ", ".join(f"{key} {value:.1f} s" for key, value in report["phases_s"].items())
    return (f"prepared {report['corpus_mb']:.0f} MB in {report['seconds']:.1f} s: {report['mb_per_s']:.1f} MB/s "
            f"with {report['workers']} worker(s) ({phases})\n"
            f"peak RSS: main {report['main_peak_mb']:.0f} MB, largest worker {report['worker_peak_mb']:.0f} MB, "
            f"bound main + workers x worker {report['peak_bound_mb']:.0f} MB\n"
            f"tokens {report['tokens']}, shards {report['shards']}, tokenizer sample "
            f"{report['tokenizer_sample_mb']:.0f} MB")


if __name__ == "__main__":  # worker: python -m loopdb.evaluation.prepare_bench CORPUS OUT WORKERS VOCAB_SIZE
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
