"""A RayPPOTrainer subclass for tests of `trainer_cls=`: records how verl's TaskRunner built it.

It starts no workers and trains nothing: `fit()` writes what the constructor received, as JSON, to
the path in the config key `probe_output`, then returns.
"""

import json
import os
import sys

from verl.trainer.ppo.ray_trainer import RayPPOTrainer


class ProbeTrainer(RayPPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probe = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "positional_args": len(args),
            "kwargs": sorted(kwargs),
            "train_dataset_len": len(kwargs["train_dataset"]),
            "tokenizer": type(kwargs["tokenizer"]).__name__,
            "pid": os.getpid(),
            "core_algos_file": sys.modules["verl.trainer.ppo.core_algos"].__file__,
            "ray_trainer_file": sys.modules["verl.trainer.ppo.ray_trainer"].__file__,
        }

    def init_workers(self):
        self._probe["init_workers_called"] = True

    def fit(self):
        with open(self.config.probe_output, "w") as f:
            json.dump(self._probe, f)


class NotATrainer:
    pass
