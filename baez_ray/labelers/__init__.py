"""Labelling methods, one module per method (SPEC §2).

Tier-1 methods (no frontier LLM) are registered in TIER1: name → function
`(features table, routes table) -> labels table` (schema.LABELS rows).
The LLM methods (eleuther_acts_topK, np_max_act, small_llm) go through
baez_ray.stages.label and the backend interface.
"""

from __future__ import annotations

from baez_ray.labelers.token_freq import token_freq_labels

TIER1 = {"token_freq": token_freq_labels}

__all__ = ["TIER1", "token_freq_labels"]
