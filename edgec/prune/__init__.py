"""Latency-budget structured pruning: ALCS allocation (``alcs``) and the ``edgec prune`` pipeline (``run``)."""
