"""Evaluate mode: the trainer generates, an environment service judges and computes advantages.

``request`` (a verl batch -> the service's request), ``client`` (the environment service's HTTP
client), ``answer`` (reading its answer sample by sample), ``feedback`` (one step's round trip and
what to do when it fails); with several environments (docs/many_environments.md), ``environments``
(the section and routing by data_source), ``multi`` (every environment's round trip in one step)
and ``mixing`` (the sampler that mixes the data by environment weight). Kept free of imports here,
so that the client (and config.py's check of ``environments``) does not pull in torch.
"""
