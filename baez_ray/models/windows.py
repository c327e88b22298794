"""Windows around an example's top-activating token (SPEC §4).

A window [a, b] picks the tokens t+a … t+b of an example whose top token is at position t
(`top_index`), clipped to the example's ends: input [-3, 0] is the top token and the three
before it, output [1, 3] the three tokens after it, cross [-8, 8] both sides. A window that
falls wholly outside the example (output window of an example that ends at its top token)
is empty.

Window text is the tokens joined as text. Token strings are decoded text (" the") as
`collect` and `ingest` write them; raw vocabulary pieces are tolerated: a leading
sentencepiece `▁` or byte-level `Ġ` becomes a space and byte-level `Ċ` a newline, and
special tokens (`<bos>`, `<|endoftext|>`, ...) are left out, so that they do not make
windows look alike to the embedder.

`TopExamples` takes the top-N examples of a batch of features (a pyarrow table with the
features table's `examples` column) and cuts their windows; the route stage and the
token_freq labeller share it, so both look at the same examples.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Window = tuple[int, int]  # defaults: config.RouteWindows

# special tokens of common tokenizers, as decoded on their own
SPECIAL_TOKEN = re.compile(r"^(<\|[^|<>\s]+\|>|<(bos|eos|pad|unk|s|/s|mask|cls|sep|start_of_turn|end_of_turn|start_of_image|end_of_image)>|\[(CLS|SEP|PAD|UNK|MASK)\])$")
_LEADING_MARKERS = re.compile(r"^[▁ĠĊĉ]+")
_MARKER_TEXT = {"▁": " ", "Ġ": " ", "Ċ": "\n", "ĉ": "\t"}


def bounds(n_tokens: int, top_index: int, window: Sequence[int]) -> tuple[int, int]:
    """Slice [lo, hi) of the window's tokens, clipped to [0, n_tokens); lo == hi when empty."""
    a, b = int(window[0]), int(window[1])
    lo = max(0, top_index + a)
    hi = min(n_tokens, top_index + b + 1)
    return lo, max(lo, hi)


def window_tokens(token_strs: Sequence[str], top_index: int, window: Sequence[int]) -> list[str]:
    lo, hi = bounds(len(token_strs), top_index, window)
    return list(token_strs[lo:hi])


def token_text(tok: str) -> str:
    """One token as text: special tokens → "", leading ▁/Ġ → space, Ċ → newline."""
    if tok is None or SPECIAL_TOKEN.match(tok):
        return ""
    m = _LEADING_MARKERS.match(tok)
    if m:
        tok = "".join(_MARKER_TEXT[c] for c in m.group(0)) + tok[m.end() :]
    return tok.replace("▁", " ")


def join_tokens(tokens: Sequence[str]) -> str:
    """Tokens → text (markers converted, special tokens left out), outer whitespace stripped."""
    return "".join(token_text(t) for t in tokens).strip()


def window_text(token_strs: Sequence[str], top_index: int, window: Sequence[int]) -> str:
    """The window's text; "" when the window is empty or holds only whitespace/special tokens."""
    lo, hi = bounds(len(token_strs), top_index, window)
    return join_tokens(token_strs[lo:hi])


class TopExamples:
    """The top-N examples of a batch of features, flattened: example e belongs to feature
    feat[e]; features' examples are contiguous and in rank order."""

    def __init__(self, batch: pa.Table, top_n: int):
        ex = batch.column("examples").combine_chunks()
        n_feat = len(ex)
        lengths = pc.fill_null(pc.list_value_length(ex), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(ex)
        feat = np.repeat(np.arange(n_feat), lengths)
        is_top = pc.equal(pc.struct_field(flat, "kind"), "top").to_numpy(zero_copy_only=False)
        rank = pc.struct_field(flat, "rank").to_numpy(zero_copy_only=False).astype(np.float64)
        value = pc.struct_field(flat, "value").to_numpy(zero_copy_only=False).astype(np.float64)
        has_top = np.zeros(n_feat, dtype=bool)
        np.logical_or.at(has_top, feat, is_top)
        use = is_top | ~has_top[feat]
        key = np.where(has_top[feat], rank, -value)  # by rank; by decreasing value without top examples
        order = np.lexsort((key, feat))
        order = order[use[order]]
        # keep the first top_n of each feature
        f_sorted = feat[order]
        counts = np.bincount(f_sorted, minlength=n_feat)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        within = np.arange(len(order)) - starts[f_sorted]
        sel = order[within < top_n]
        self.n_features = n_feat
        self.feat = feat[sel]
        self.n_examples = np.bincount(self.feat, minlength=n_feat).astype(np.int32)
        self.value = value[sel]
        self.top_index = pc.struct_field(flat, "top_index").to_numpy(zero_copy_only=False)[sel].astype(np.int64)
        toks = pc.struct_field(flat, "token_strs").take(pa.array(sel, type=pa.int64()))
        offs = toks.offsets.to_numpy().astype(np.int64)
        self.tok_offsets = offs - offs[0]
        strs = toks.flatten().to_pylist()
        # each distinct token string converted to text once (markers, special tokens)
        as_text = {s: token_text(s) for s in set(strs)}
        self.tokens = [as_text[s] for s in strs]

    def texts(self, window: Sequence[int], rows: np.ndarray | None = None) -> list[str]:
        """Window text of each example (or of the examples `rows`); "" for empty windows."""
        rows = np.arange(len(self.feat)) if rows is None else rows
        out, toks, offs, top = [], self.tokens, self.tok_offsets, self.top_index
        for e in rows:
            start, end = offs[e], offs[e + 1]
            lo, hi = bounds(int(end - start), int(top[e]), window)
            out.append("".join(toks[start + lo : start + hi]).strip())
        return out

    def window_tokens(self, e: int, window: Sequence[int]) -> list[str]:
        """The tokens (as text) of example e's window."""
        start, end = self.tok_offsets[e], self.tok_offsets[e + 1]
        lo, hi = bounds(int(end - start), int(self.top_index[e]), window)
        return self.tokens[start + lo : start + hi]

    def rows_of(self, f: int) -> range:
        """The example rows of feature f (contiguous)."""
        start = int(np.searchsorted(self.feat, f, side="left"))
        return range(start, start + int(self.n_examples[f]))
