"""The items of `logit_embedding`, an output-side benchmark (benchmarks.py): does the label
say what the feature writes to the output? The score stage embeds each label with these
texts and scores it as `embedding` scores excerpts (stages/score.py: gap, AUROC, halves).

    test rows (sae_id, feature, pos_tokens, pos_values: the logit lens, collect's or the
               export's)
      ─tag: the block of the feature (the blocks of the excerpt negatives)─▶
      groupby(block).map_groups ─▶ one row per feature (sae_id, feature, texts, truth):
          positives: the texts of its top `logit_tokens` promoted tokens, by value, each
                     token on its own (special tokens and whitespace left out, repeats once);
          negatives: as many promoted-token texts of the other features of its block, none
                     equal to one of its positives, drawn uniformly without repeats (seeded
                     per feature), so a shared token ("the", ",") counts for neither side.

A feature without promoted tokens (an export without them) gets a row with no texts: its
score row has n_shown 0 and no metrics, counted, never dropped. The embedder compares the
label with single tokens, so a label that names the promoted tokens themselves scores
highest; one that describes where the feature fires scores what its words share with them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from baez_ray.config import ScoreConfig
from baez_ray.models.windows import token_text
from baez_ray.ray_pool import resolved
from baez_ray.stages.split import feature_seed

VERSION = "logit_embedding/v1"
LOGIT_ITEMS = pa.schema([pa.field("sae_id", pa.string()), pa.field("feature", pa.int64()), pa.field("texts", pa.list_(pa.string())),
                         pa.field("truth", pa.list_(pa.int8()))])


def promoted_texts(tokens: list[str] | None, values: list[float] | None, n: int) -> list[str]:
    """The texts of the `n` most promoted tokens (by value when given), stripped, without
    empty ones and repeats."""
    if not tokens:
        return []
    order = range(len(tokens))
    if values is not None and len(values) == len(tokens):
        order = sorted(order, key=lambda i: -(values[i] if values[i] is not None else -np.inf))
    out: list[str] = []
    for i in order:
        text = token_text(tokens[i]).strip() if tokens[i] is not None else ""
        if text and text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def block_logit_items(promoted: dict[tuple[str, int], list[str]], cfg: ScoreConfig, seed: int) -> list[dict]:
    """LOGIT_ITEMS rows of one block: `promoted` maps each feature to its promoted-token
    texts (`promoted_texts`)."""
    out = []
    for key in sorted(promoted):
        pos = promoted[key]
        own = set(pos)
        pool = sorted({t for k, ts in promoted.items() if k != key for t in ts} - own)
        rng = np.random.default_rng(feature_seed(seed, key[0], key[1]) + 1)
        take = rng.choice(len(pool), size=min(len(pos), len(pool)), replace=False) if pos and pool else []
        neg = [pool[i] for i in take]
        out.append({"sae_id": key[0], "feature": key[1], "texts": pos + neg, "truth": [1] * len(pos) + [0] * len(neg)})
    return out


def _tag_logits(batch: pa.Table, blocks, cfg: ScoreConfig) -> pa.Table:
    """Rows (sae_id, feature, pos_tokens, pos_values) of the features in `blocks` → (sae_id,
    feature, block, texts)."""
    blocks = resolved(blocks)
    if "pos_tokens" not in batch.column_names:
        raise ValueError("logit_embedding reads the features' promoted tokens (pos_tokens): the test rows have none")
    idx = pa.table({"sae_id": batch.column("sae_id"), "feature": batch.column("feature").cast(pa.int64()),
                    "_row": pa.array(np.arange(batch.num_rows), pa.int64())})
    hit = idx.join(blocks, ["sae_id", "feature"], join_type="inner").sort_by("_row")
    rows = hit.column("_row")
    values = batch.column("pos_values").take(rows).to_pylist() if "pos_values" in batch.column_names else [None] * len(rows)
    texts = [promoted_texts(t, v, cfg.logit_tokens) for t, v in zip(batch.column("pos_tokens").take(rows).to_pylist(), values)]
    return pa.table({"sae_id": hit.column("sae_id"), "feature": hit.column("feature"), "block": hit.column("block"),
                     "texts": pa.array(texts, pa.list_(pa.string()))})


def _items_group(group: pa.Table, cfg: ScoreConfig, seed: int) -> pa.Table:
    promoted: dict[tuple[str, int], list[str]] = {}
    for s, f, ts in zip(*(group.column(c).to_pylist() for c in ("sae_id", "feature", "texts"))):
        promoted.setdefault((s, f), ts)
    rows = block_logit_items(promoted, cfg, seed)
    return pa.Table.from_pylist(rows, schema=LOGIT_ITEMS) if rows else LOGIT_ITEMS.empty_table()


def logit_items_dataset(tests, blocks, n_blocks: int, cfg: ScoreConfig, seed: int, max_partitions: int = 64):
    """Ray Dataset of LOGIT_ITEMS rows, one per feature of `blocks` (an ObjectRef of the
    score stage's feature_blocks table): `tests` is a Ray Dataset of rows with sae_id,
    feature, pos_tokens and pos_values (other columns are ignored)."""
    ds = tests.map_batches(_tag_logits, batch_format="pyarrow", fn_kwargs={"blocks": blocks, "cfg": cfg})
    return ds.groupby("block", num_partitions=min(n_blocks, max_partitions)).map_groups(
        _items_group, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "seed": seed})
