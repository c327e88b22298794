"""Labelling methods (SPEC §2), one module per family, each registered by name:

    token_freq          tier 1, no LLM: the most frequent tokens of the input/output window
    from_examples       eleuther_acts_topK, np_max_act (tier 2), small_llm (tier 1): an LLM
                        reads activation examples
    np_max_act_logits   tier 2: np_max_act's windows plus the feature's top promoted tokens
    av_explanations     baez, baez_last (tier 3): an LLM reads the AV's explanations
    nla_direct          (tier 3): the AV reads the SAE decoder row; its text is the label

Every module of this folder is imported here, so that its `@register` runs: a new method
is one new module (see docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from baez_ray.methods.registry import LabelContext, check_job_methods, examples_read, get, known, label, label_rows, needs_residuals, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "registry":
        import_module(f"{__name__}.{_m.name}")

__all__ = ["LabelContext", "check_job_methods", "examples_read", "get", "known", "label", "label_rows", "needs_residuals", "register"]
