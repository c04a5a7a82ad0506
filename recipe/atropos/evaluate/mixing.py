"""Weighted mixing of environments: a sampler that draws rows so that each environment's share of
the training data is its `weight` (trainer.atropos.environments.<name>.weight).

Each row's weight is its environment's weight over that environment's row count, so an
environment with 10 rows and one with 10,000 are drawn alike when their weights are equal. Rows
are drawn with replacement, `len(dataset)` per epoch (so verl's step count is unchanged), from a
generator seeded by `data.seed` and the epoch: a run resumed from a checkpoint draws the same
rows (the sampler and its iterator are torchdata Stateful, saved with verl's dataloader state).

verl 0.9.1 takes no sampler class from its config (`create_rl_sampler` builds a random or
sequential sampler), but `RayPPOTrainer` takes its sampler as an argument (`train_sampler`):
the recipe's trainer passes :func:`weighted_train_sampler`'s there when every environment sets a
weight, so verl's own dataloader, checkpointing and resume use it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from recipe.atropos.evaluate.environments import EnvironmentSpec, route_data_sources

__all__ = ["WeightedDataSourceSampler", "dataset_data_sources", "row_weights", "weighted_train_sampler"]

logger = logging.getLogger("verl.recipe.atropos")


def row_weights(data_sources: Sequence[Any], specs: Mapping[str, EnvironmentSpec]) -> np.ndarray:
    """float64 [N] probabilities: environment weight / that environment's rows, normalised over the
    environments that have rows (UnknownDataSourceError for a row no environment owns)."""
    sources = np.array([str(s) for s in data_sources], dtype=object)
    owner = route_data_sources(specs, sources)
    names = np.array([owner[s] for s in sources], dtype=object)
    probabilities = np.zeros(len(names), dtype=np.float64)
    for name, spec in specs.items():
        rows = names == name
        if rows.any():
            probabilities[rows] = spec.weight / rows.sum()
        elif spec.weight:
            logger.warning("environment %r (weight %s) has no rows in the training data: it is never drawn", name, spec.weight)
    return probabilities / probabilities.sum()


class _Draws(Iterator[int]):
    """One epoch's draws; Stateful, so that a resumed run goes on where it stopped."""

    def __init__(self, indices: list[int]):
        self.indices, self.yielded = indices, 0

    def __next__(self) -> int:
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.yielded = int(state["yielded"])


class WeightedDataSourceSampler(Sampler[int]):
    """Row indices drawn with replacement by :func:`row_weights`; `num_samples` (default: every row's
    count) per epoch, seeded by `seed` and the epoch."""

    def __init__(
        self, data_sources: Sequence[Any], specs: Mapping[str, EnvironmentSpec], *, seed: int = 0,
        num_samples: int | None = None,
    ):
        self.probabilities = torch.from_numpy(row_weights(data_sources, specs))
        self.num_samples = len(self.probabilities) if num_samples is None else int(num_samples)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {self.num_samples}")
        self.seed = int(seed)
        self._next_epoch = 0  # the epoch of the next iterator
        self._epoch = 0  # the epoch of the iterator in progress

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        self._epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        drawn = torch.multinomial(self.probabilities, self.num_samples, replacement=True, generator=generator)
        return _Draws(drawn.tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # The next iter() (torchdata calls it right after) redraws the saved epoch.
        self._next_epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))


def dataset_data_sources(dataset: Any) -> list[Any] | None:
    """The `data_source` column of a verl RLHFDataset (its `dataframe`), or None when unreachable."""
    frame = getattr(dataset, "dataframe", None)
    if frame is None:
        return None
    try:
        return list(frame["data_source"])
    except (KeyError, TypeError, ValueError):
        return None


def weighted_train_sampler(
    specs: Mapping[str, EnvironmentSpec] | None, dataset: Any, seed: int | None
) -> WeightedDataSourceSampler | None:
    """The sampler verl's trainer should draw training rows with (its `train_sampler` argument), or
    None when the environments set no weights (verl's own sampler then)."""
    if not specs or any(spec.weight is None for spec in specs.values()):
        return None
    sources = dataset_data_sources(dataset)
    if sources is None:
        raise ValueError(
            "trainer.atropos.environments sets weights, but the training dataset has no data_source column to mix "
            f"by ({type(dataset).__name__} has no `dataframe`): use verl's RLHFDataset or remove the weights"
        )
    sampler = WeightedDataSourceSampler(sources, specs, seed=seed or 0, num_samples=len(sources))
    shares = {name: round(float(spec.weight), 4) for name, spec in specs.items()}
    logger.warning("training rows are drawn by environment weight %s (with replacement, %d per epoch)", shares, len(sampler))
    return sampler
