"""Structured pruning: coupled-channel analysis (:mod:`edgec.prune.groups`); the structural pass that
physically removes channels is ``edgec.passes.prune_channels`` (``prune.channels``)."""
from edgec.prune.groups import (Analysis, Group, Slot, analyse, describe_groups, find_groups, importance,
                                keep_from_counts, resolve_keep, zero_channels)

__all__ = ["Analysis", "Group", "Slot", "analyse", "describe_groups", "find_groups", "importance",
           "keep_from_counts", "resolve_keep", "zero_channels"]
