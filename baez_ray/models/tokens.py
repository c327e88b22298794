"""Token strings ↔ token ids, for examples that carry display strings only (a Neuronpedia
export) and for writing such exports.

How Neuronpedia writes a token. Its bulk exports come from SAEDashboard's
NeuronpediaRunner, which renders each id as its *vocabulary piece* (`tokenizer.vocab`:
'▁the' for a SentencePiece tokenizer such as Gemma's, 'Ġthe' for byte-level BPE) with a
few byte-level artefacts replaced by what they spell (Ġ → space, Ċ → newline, ĉ → tab, and
the mis-decoded UTF-8 of — – “ ” ‘ ’ and of the zero-width space); the web app only swaps
▁ for a space when it shows them. Neuronpedia's inference server (its activation
endpoints) writes TransformerLens' `to_str_tokens` instead: each id decoded on its own
(' the'; every byte-fallback token of a SentencePiece vocabulary then decodes to '�').

`TokenMap` maps a string back to one id by trying, in this order:
1. the vocabulary pieces (one id per piece, special tokens such as '<bos>' included, and
   SentencePiece byte-fallback pieces such as '<0x0A>');
2. the pieces as SAEDashboard renders them (`neuronpedia_piece`);
3. each id decoded on its own (what `collect` writes, and `to_str_tokens`).
The first form that knows the string decides: one id, or a named refusal when several ids
render as that string (e.g. '�', the decoded form of every byte-fallback token); a string
that no form knows is refused too. So the round trip ids → strings → ids is exact for
every id whose rendering no other id shares (`round_trip_misses` lists the others: for
Gemma 3's 262k vocabulary, see docs/residuals.md).
"""

from __future__ import annotations

from collections import defaultdict

# SAEDashboard's replacements of byte-level BPE artefacts in vocabulary pieces (the
# mis-decoded UTF-8 of common punctuation, and the byte-level space, newline and tab)
NEURONPEDIA_REPLACEMENTS = {
    "âĢĶ": "—", "âĢĵ": "–", "âĢľ": "“", "âĢĿ": "”", "âĢĺ": "‘", "âĢĻ": "’", "âĢĭ": " ",
    "Ġ": " ", "Ċ": "\n", "ĉ": "\t",
}


def neuronpedia_piece(piece: str) -> str:
    """A vocabulary piece as Neuronpedia's bulk exports write it (SAEDashboard's replacements)."""
    for old, new in NEURONPEDIA_REPLACEMENTS.items():
        piece = piece.replace(old, new)
    return piece


class TokenRefused(ValueError):
    """A token string that maps to no single id; the message names it."""


class TokenMap:
    """A tokenizer's strings → ids (see the module docstring) and ids → Neuronpedia strings."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pieces: dict[str, int] = dict(tokenizer.get_vocab())
        self.n = max(self.pieces.values()) + 1
        self.piece_of = [""] * self.n
        for piece, i in self.pieces.items():
            self.piece_of[i] = piece
        self._display: dict[str, list[int]] | None = None
        self._decoded: dict[str, list[int]] | None = None

    def render(self, ids) -> list[str]:
        """ids → the strings a Neuronpedia bulk export carries for them."""
        return [neuronpedia_piece(self.piece_of[int(i)]) for i in ids]

    def _forms(self) -> list[dict[str, list[int]]]:
        """The three forms of every id, each string → the ids that render as it (built once)."""
        if self._display is None:
            display, decoded = defaultdict(list), defaultdict(list)
            for i, piece in enumerate(self.piece_of):
                display[neuronpedia_piece(piece)].append(i)
            for i, text in enumerate(self.tok.batch_decode([[i] for i in range(self.n)])):
                decoded[text].append(i)
            self._display, self._decoded = dict(display), dict(decoded)
        return [{p: [i] for p, i in self.pieces.items()}, self._display, self._decoded]

    def id_of(self, s: str) -> int:
        """The one id that renders as `s`; TokenRefused naming it otherwise."""
        hit = self.pieces.get(s)
        if hit is not None:
            return hit
        for form in self._forms()[1:]:
            ids = form.get(s)
            if ids is not None:
                if len(ids) > 1:
                    shown = ", ".join(map(str, ids[:5])) + (f", ... ({len(ids)} ids)" if len(ids) > 5 else "")
                    raise TokenRefused(f"ambiguous token string {s!r}: ids {shown} all render as it")
                return ids[0]
        raise TokenRefused(f"unknown token string {s!r}: no token id of the tokenizer renders as it")

    def ids_of(self, strings) -> list[int]:
        """Every string's id; TokenRefused naming the first string that has none, and where."""
        out = []
        for pos, s in enumerate(strings):
            try:
                out.append(self.id_of(s))
            except TokenRefused as e:
                raise TokenRefused(f"token {pos}: {e}") from None
        return out

    def round_trip_misses(self) -> list[int]:
        """The ids whose Neuronpedia string maps back to another id, or to none."""
        misses = []
        for i, s in enumerate(self.render(range(self.n))):
            try:
                if self.id_of(s) != i:
                    misses.append(i)
            except TokenRefused:
                misses.append(i)
        return misses
