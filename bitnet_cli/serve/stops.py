"""A reply's text with its stop strings cut off, as OpenAI's `stop` does: the text ends before
the first stop string, which is not part of it. While streaming, text that could still be the
start of a stop string is held back until the next tokens show it is not (or the reply ends)."""

from __future__ import annotations


class StopText:
    def __init__(self, pieces, stops: tuple[str, ...]):
        self.pieces, self.stops = pieces, tuple(s for s in stops if s)
        self.held = ""  # decoded, not given out yet
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        """The text this token lets out, and whether a stop string has now been reached."""
        self.held += self.pieces.add(token)
        return self._release(final=False)

    def rest(self) -> str:
        """What is left when the reply ends otherwise: the held text, up to a stop string."""
        if self.stopped:
            return ""
        self.held += self.pieces.rest()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        found = [i for i in (self.held.find(stop) for stop in self.stops) if i >= 0]
        if found:
            out, self.held, self.stopped = self.held[:min(found)], "", True
            return out, True
        keep = 0 if final else self._partial_stop()
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def _partial_stop(self) -> int:
        """Characters at the end of the held text that begin some stop string."""
        return max((k for stop in self.stops for k in range(1, len(stop))
                    if self.held.endswith(stop[:k])), default=0)
