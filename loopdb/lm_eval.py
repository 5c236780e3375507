"""lm-eval's own command line with the loopdb model registered:

    python -m loopdb.lm_eval --model loopdb --model_args run=RUN,num_loops=8 --tasks hellaswag ...

Every flag goes to lm-eval's CLI unchanged (so lm-eval habits work); importing
loopdb.evaluation.lm_eval_model registers ``--model loopdb``. ``loopdb eval`` stays the
loop-count sweep. A front end, like loopdb.cli: no library module imports it.
"""

from __future__ import annotations


def main() -> None:
    from .evaluation import lm_eval_model  # noqa: F401  (registers --model loopdb)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()  # reads sys.argv itself


if __name__ == "__main__":
    main()
