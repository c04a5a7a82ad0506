"""Trajectory mode: Atropos environments generate through the policy and push scored groups to run-api.

``runapi_client`` (atroposlib run-api's HTTP client), ``scored_data`` (``ScoredData`` groups -> a
verl batch; each sequence checked in ``scored_samples``), ``metrics`` (what one batch says),
``rollout`` (the rollout manager that pulls each step's batch), ``gateway`` (the environments' one
address in front of verl's rollout servers; its state in ``gate``, its routes in ``gateway_routes``),
``weight_sync`` (verl's weight-sync manager closing the gateway around weight updates),
``generate_api`` (the ``/generate`` dialects), ``diagnostics`` (why no batch arrives), ``mode``
(the trainer's hooks in this mode). Kept free of imports here, so that importing one of them does
not pull in the rest.
"""
