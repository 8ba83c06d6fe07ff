"""How long the search runs: the reference's share of the fine-tune that follows it."""

from __future__ import annotations

import math
from dataclasses import replace

from ..finetune import FinetuneSettings, planned_steps
from .settings import SearchSettings

#: The reference searches on (at most) this many training examples.
REFERENCE_SEARCH_SET = 5000
#: A sized search shorter than this warns that alpha may not have separated the blocks.
SHORT_SEARCH = 10


def search_set_size(train_size: int, search: SearchSettings, finetune: FinetuneSettings | None = None) -> int:
    """Examples the search trains LoRA on: the first `search_train_size` (None: up to 5,000) of the training
    set, and never more than the fine-tune it precedes uses."""
    available = train_size
    if finetune is not None and finetune.max_train_examples:
        available = min(available, finetune.max_train_examples)
    return min(available, search.search_train_size or REFERENCE_SEARCH_SET)


def default_search_steps(train_size: int, search: SearchSettings, finetune: FinetuneSettings | None = None) -> int:
    """The reference's search length on a training set of `train_size` examples.

    The reference makes one pass over a 5,000-example search set and then fine-tunes three epochs on up to
    20,000 examples: the search trains LoRA on a twelfth of the fine-tune's examples, and since a search step
    costs about two LoRA steps, it spends about a fifth of the fine-tune's compute. Here the search makes one
    pass over its search set (`search_set_size`); when `finetune` is capped by `max_steps`, the pass is
    shortened by the same factor, so the proportion between the two stages stays the reference's.
    """
    one_pass = math.ceil(search_set_size(train_size, search, finetune) / search.batch_size)
    if finetune is None:
        return one_pass
    uncapped = planned_steps(train_size, replace(finetune, max_steps=None))
    return max(1, round(one_pass * planned_steps(train_size, finetune) / uncapped))
