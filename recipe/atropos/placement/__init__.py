"""Where trajectory mode's rollout servers run: `trainer.atropos.rollout_placement`.

`colocated` (default): on the actor's devices, asleep while it trains (trajectory/weight_sync.py).
`separate`: on a resource pool of their own, through verl's separation seam
(`verl.experimental.separation.SeparateRayPPOTrainer`): environments keep generating through the
policy gateway while the actor updates; the gateway pauses only for each weight swap.

- separate_trainer.py: `SeparateGRPOAtroposTrainer`, the recipe's trainer on verl's separated one;
- weight_sync.py: `SeparatedCheckpointEngineManager`, servers never put to sleep, the gateway closed
  around verl's weight sync only, the step's `atropos/async/...` metrics;
- restarts.py: a rollout server that died is started again and given the current weights;
- timing_model.py: steps per minute of either placement from measured phase times.

docs/async.md says when to choose which.
"""
