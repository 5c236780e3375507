"""The lists of names several layers read, each defined once. Imports nothing, so the config, the
objectives, the readouts, the evaluation and the command line (argparse ``choices``) can all read it.

The other registries live with what they name: presets (loopdb.config.PRESETS), families
(loopdb.config.FAMILY_NAMES; loopdb.families builds them), reasoning tasks (loopdb.tasks.TASKS) and
the data cache root (loopdb.data.storage.cache_root).
"""

# the training objectives of the looped and stacked LMs (loopdb.objectives.next_token.make_objective)
OBJECTIVES = ("diffusion", "bptt", "ouro", "dense")

# how a token's log-likelihood is read from the loops (loopdb.readouts.scoring.token_logprobs; docs/method.md#scoring)
READOUTS = ("predictive", "last", "elbo", "elbo_continuous", "anchor")
LOOP_FREE_READOUTS = ("anchor",)  # the dense anchor head: one clean pass, whatever K
BLOCK_READOUTS = ("block_elbo",)  # drafting runs: the K-step bound on L-token blocks (loopdb.readouts.drafting)
TASK_READOUTS = ("accuracy", "accuracy_beyond")  # reasoning-task runs: trained and harder difficulties
STUDY_READOUTS = READOUTS + BLOCK_READOUTS + TASK_READOUTS  # what `loopdb study` can score a member by
STUDY_DEFAULT_READOUTS = ("predictive", "last", "elbo")

# a target that is not scored (reasoning tasks score answer tokens only); F.cross_entropy's default ignore_index
IGNORE_INDEX = -100
