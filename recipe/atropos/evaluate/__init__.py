"""Evaluate mode: the trainer generates, an environment service judges and computes advantages.

``request`` (a verl batch -> the service's request), ``client`` (the environment service's HTTP
client), ``answer`` (reading its answer sample by sample), ``feedback`` (one step's round trip and
what to do when it fails). Kept free of imports here, so that the client does not pull in torch.
"""
