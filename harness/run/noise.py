"""Seeded noise for the test split (docs/noise.md): byte typos, case flips and whitespace changes,
each at a declared rate, with the bookkeeping that says where every noised byte came from.

Every clean byte that a rule may touch is edited independently with probability `rate`, the edit
drawn by the rule's shares, so each kind of edit is a binomial count. Plain numpy: the same text,
rule and seed give the same noised bytes on every machine, for every model and training seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# the edits of each kind of rule, in the order their shares are drawn
EDITS = {
    "typos": ("substitute", "insert", "delete", "transpose"),  # per byte
    "case": ("flip",),  # per ASCII letter
    "whitespace": ("delete", "duplicate", "swap"),  # per ASCII whitespace byte
}
# substituted and inserted bytes are ASCII letters: the commonest typo is a wrong letter, and a
# letter keeps the noised text valid UTF-8 wherever it lands between characters
LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)
SPACE, NEWLINE = ord(" "), ord("\n")


@dataclass(frozen=True)
class Noised:
    """A noised text and its bookkeeping. `source[p]`: the clean index noised byte p came from, -1
    for an inserted byte; `changed`: clean index -> clean byte, for the bytes carried over with a
    new value (substituted, flipped, swapped); `deleted`: clean index -> clean byte; `counts`: the
    edits made, by name (a transposition of two equal bytes counts, though it changes nothing)."""

    text: bytes
    source: np.ndarray
    clean_length: int
    counts: dict[str, int]
    changed: dict[int, int] = field(default_factory=dict)
    deleted: dict[int, int] = field(default_factory=dict)

    @property
    def inserted(self) -> int:
        return int((self.source < 0).sum())

    @property
    def substituted(self) -> int:
        return len(self.changed)

    @property
    def kept(self) -> int:
        """Clean bytes carried over unchanged (a transposed byte is kept, in another place)."""
        return int((self.source >= 0).sum()) - len(self.changed)

    def restore(self) -> bytes:
        """The clean text, rebuilt from the noised bytes and the bookkeeping alone."""
        clean = np.full(self.clean_length, -1, dtype=np.int64)
        carried = self.source >= 0
        clean[self.source[carried]] = np.frombuffer(self.text, dtype=np.uint8)[carried]
        for index, byte in (self.changed | self.deleted).items():
            clean[index] = byte
        if (clean < 0).any():
            raise ValueError("the bookkeeping leaves clean bytes unaccounted for")
        return clean.astype(np.uint8).tobytes()


def apply(text: bytes, kind: str, rate: float, shares: dict[str, float] | None, seed: int) -> Noised:
    """`text` noised by one rule: kind (a key of EDITS) at `rate` per eligible byte, its edits drawn
    by `shares` (relative weights; default equal). Deterministic for (text, kind, rate, shares, seed)."""
    clean = np.frombuffer(text, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    edit = _draw_edits(clean, kind, rate, shares, rng)
    if kind == "typos":
        return _typos(clean, edit, rng)
    if kind == "case":
        return _case(clean, edit)
    if kind == "whitespace":
        return _whitespace(clean, edit)
    raise ValueError(f"unknown noise kind {kind!r} (one of {', '.join(EDITS)})")


def _draw_edits(clean: np.ndarray, kind: str, rate: float, shares: dict[str, float] | None,
                rng: np.random.Generator) -> np.ndarray:
    """Per clean byte: -1 (left alone) or the index of its edit in EDITS[kind]. One uniform draw per
    byte, eligible or not, so that the bytes a rule may touch do not shift the others' draws."""
    names = EDITS[kind]
    weights = np.array([1.0 if shares is None else shares.get(name, 0.0) for name in names])
    edited = rng.random(len(clean)) < rate
    if kind == "case":
        edited &= np.isin(clean, LETTERS)
    elif kind == "whitespace":
        edited &= np.isin(clean, WHITESPACE)
    choice = rng.choice(len(names), size=len(clean), p=weights / weights.sum())
    return np.where(edited, choice, -1)


def _letters_other_than(bytes_: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform ASCII letter for each byte, never the byte itself."""
    is_letter = np.isin(bytes_, LETTERS)
    pick = (rng.random(len(bytes_)) * np.where(is_letter, len(LETTERS) - 1, len(LETTERS))).astype(np.int64)
    own = np.searchsorted(LETTERS, bytes_)  # LETTERS is sorted: a letter's own index
    return LETTERS[pick + (is_letter & (pick >= own))]


def _typos(clean: np.ndarray, edit: np.ndarray, rng: np.random.Generator) -> Noised:
    """Substitute: a different letter in place. Insert: a letter before the byte. Delete. Transpose:
    the byte swaps places with the noised byte before it (left alone where none is before it)."""
    substitute, insert, delete, transpose = (edit == i for i in range(4))
    copies = np.where(delete, 0, np.where(insert, 2, 1))
    own_place = np.cumsum(copies) - 1  # each clean byte's place in the noised text (if it has one)
    transpose &= own_place > 0
    source = np.repeat(np.arange(len(clean)), copies)
    text = clean[source].copy()
    inserted_at = own_place[insert] - 1  # an inserted letter goes before its clean byte
    source[inserted_at] = -1
    text[inserted_at] = LETTERS[rng.integers(len(LETTERS), size=len(inserted_at))]
    text[own_place[substitute]] = _letters_other_than(clean[substitute], rng)
    for place in own_place[transpose]:  # in order, so that neighbouring transpositions compose
        text[[place - 1, place]] = text[[place, place - 1]]
        source[[place - 1, place]] = source[[place, place - 1]]
    counts = {"substitute": int(substitute.sum()), "insert": int(insert.sum()), "delete": int(delete.sum()),
              "transpose": int(transpose.sum())}
    return Noised(text.tobytes(), source, len(clean), counts, _originals(clean, substitute), _originals(clean, delete))


def _case(clean: np.ndarray, edit: np.ndarray) -> Noised:
    """Flip: an ASCII letter to the other case (bit 0x20)."""
    flip = edit == 0
    text = np.where(flip, clean ^ 0x20, clean).astype(np.uint8)
    return Noised(text.tobytes(), np.arange(len(clean)), len(clean), {"flip": int(flip.sum())}, _originals(clean, flip))


def _whitespace(clean: np.ndarray, edit: np.ndarray) -> Noised:
    """Delete the whitespace byte; duplicate it (the copy, after it, is an inserted byte); or swap it:
    a space becomes a newline, any other whitespace byte (newline, tab, CR, ...) a space."""
    delete, duplicate, swap = (edit == i for i in range(3))
    swapped = np.where(clean == SPACE, NEWLINE, SPACE).astype(np.uint8)
    changed = np.where(swap, swapped, clean).astype(np.uint8)
    copies = np.where(delete, 0, np.where(duplicate, 2, 1))
    source = np.repeat(np.arange(len(clean)), copies)
    text = changed[source]
    source[np.cumsum(copies)[duplicate] - 1] = -1  # the second copy is the inserted one
    counts = {"delete": int(delete.sum()), "duplicate": int(duplicate.sum()), "swap": int(swap.sum())}
    return Noised(text.tobytes(), source, len(clean), counts, _originals(clean, swap), _originals(clean, delete))


def _originals(clean: np.ndarray, where: np.ndarray) -> dict[int, int]:
    return {int(i): int(clean[i]) for i in np.flatnonzero(where)}


def noised_contexts(noised: Noised, window: int, windows: int) -> np.ndarray:
    """For clean windows 1 .. windows-1 of `window` bytes: the window // 2 noised bytes that come
    before the noised text's copy of the window's second half, (windows - 1, window // 2) uint8.
    The noised text before clean index j is every noised byte placed before the first byte from
    index j or later (bytes inserted just before it included; a transposition across j left out).
    Window 0 has none: its context could need noised bytes before the split's start."""
    half = window // 2
    reached = np.maximum.accumulate(np.where(noised.source >= 0, noised.source + 1, 0))  # clean bytes reached so far
    cuts = np.searchsorted(reached, np.arange(1, windows) * window + half, side="right")
    if len(cuts) and cuts.min() < half:
        raise ValueError(f"the noised text holds fewer than {half} bytes before a continuation: "
                         "the rule deletes too much for the conditional form")
    text = np.frombuffer(noised.text, dtype=np.uint8)
    return np.stack([text[cut - half : cut] for cut in cuts]) if len(cuts) else np.zeros((0, half), np.uint8)
