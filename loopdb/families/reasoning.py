"""The data side of a looped-family run on a reasoning task (loopdb.tasks, ``--task=s3``):
examples generated on the fly from each step's generator, the loss on answer tokens only,
and validation accuracy per loop count."""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import ConfigError
from ..readouts.reasoning import evaluation_difficulties, evaluation_examples, task_accuracy, within_training
from ..sampling import sampler_of
from ..tasks import get_task, training_arrays


class ReasoningFeed:
    def __init__(self, config: Config, data_dir=None):
        self.config = config
        self.task = get_task(config.train.task)
        self.tokenizer = self.task.tokenizer()
        config.model.vocab_size = self.tokenizer.vocab_size
        train = config.train
        self.trained = tuple(train.train_difficulties)
        self.difficulties = evaluation_difficulties(train)
        self.val_examples = evaluation_examples(self.task, "val", self.difficulties, max(1, train.eval_examples // 4))
        self.start_token = config.model.start_token
        longest = max(len(training_arrays(self.task, [example], start_token=self.start_token)[0][0])
                      for example in self.task.generate(0, max(self.difficulties), 1))
        if longest > config.model.context:
            raise ConfigError(f"the {self.task.name} task at difficulty {max(self.difficulties)} needs {longest} "
                              f"positions; raise --context to at least {longest} or lower the difficulties")

    def batch(self, generator: torch.Generator, device) -> dict:
        """batch_size examples at uniformly drawn trained difficulties, all from the step's generator."""
        batch_size = self.config.train.batch_size
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        picks = torch.randint(len(self.trained), (batch_size,), generator=generator).tolist()
        examples = []
        for index in sorted(set(picks)):
            examples += self.task.generate(seed, self.trained[index], picks.count(index))
        inputs, targets = training_arrays(self.task, examples, start_token=self.start_token)
        return {"inputs": inputs.to(device), "targets": targets.to(device)}

    def evaluate(self, model, device, autocast) -> dict:
        """Validation accuracy per eval loop count: within the trained difficulties, and beyond them."""
        train = self.config.train
        trained = [e for e in self.val_examples if within_training(e.difficulty, train)]
        beyond = [e for e in self.val_examples if not within_training(e.difficulty, train)]
        results = {}
        with autocast():
            for loops in train.eval_loops if sampler_of(model).has_loops else (1,):
                results[f"val/accuracy@{loops}"] = task_accuracy(model, self.task, trained, loops, seed=train.seed,
                                                                 device=device)["accuracy"]
                if beyond:
                    results[f"val/accuracy_beyond@{loops}"] = task_accuracy(
                        model, self.task, beyond, loops, seed=train.seed, device=device)["accuracy"]
        return results

    def sample_text(self, model, step: int):
        return None
