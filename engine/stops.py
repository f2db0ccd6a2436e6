"""Stop strings, decided once, on the leader, as tokens come.

Each sequence with stop strings keeps its text, grown by incremental detokenisation (vLLM's
prefix/read offsets: the newest tokens are decoded together with a few before them, so tokenizers
that drop a leading space at the start of a decode, or emit half a UTF-8 character per byte
token, still give the text a full decode would). Only the tail that the new text can complete is
searched, so a token costs O(new text + longest stop string), not a decode of the whole output.
The server's streams show text the same way (StreamedText, on rank 0): a piece once it can no
longer change. No torch: `decode` is the tokenizer's ids -> text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

Decode = Callable[[list[int]], str]


@dataclass
class TextState:
    text: str = ""
    prefix_offset: int = 0  # first token of the window decoded for context
    read_offset: int = 0    # tokens whose text is already in `text`


def advance(state: TextState, output: list[int], decode: Decode) -> str:
    """Appends the text of tokens beyond state.read_offset; returns what was added ("" while the
    newest tokens end inside a multi-byte character)."""
    before = decode(output[state.prefix_offset:state.read_offset])
    after = decode(output[state.prefix_offset:])
    if len(after) <= len(before) or after.endswith("\ufffd"):
        return ""
    new = after[len(before):]
    state.text += new
    state.prefix_offset, state.read_offset = state.read_offset, len(output)
    return new


def stop_cut(state: TextState, output: list[int], stops: tuple[str, ...], decode: Decode) -> Optional[str]:
    """The text up to the first stop string if the output now contains one, else None."""
    new = advance(state, output, decode)
    if not new:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, len(state.text) - len(new) - longest + 1)  # earlier text was searched before
    hits = [i for i in (state.text.find(s, start) for s in stops) if i >= 0]
    return state.text[:min(hits)] if hits else None


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of a growing text can be shown before its request finishes: up to the first stop
    string in it, and short of a tail that a stop string may begin with (the next tokens may
    complete it, and then that tail is not part of the answer)."""
    if not stops:
        return len(text)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits)
    held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return len(text) - held


class StreamedText:
    """A streamed request's text as its tokens come: each piece shown once it can no longer
    change (incremental detokenisation; a tail a stop string may begin with is held back)."""

    def __init__(self, decode: Decode, stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.state, self.output, self.shown = TextState(), [], 0

    def add(self, tokens: list[int]) -> str:
        self.output += tokens
        advance(self.state, self.output, self.decode)
        return self._show(safe_length(self.state.text, self.stops))

    def finish(self, final_text: str) -> str:
        """The rest of the answer once the engine's result decided it (what was shown is a prefix of it)."""
        return final_text[self.shown:]

    def _show(self, upto: int) -> str:
        piece = self.state.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece
