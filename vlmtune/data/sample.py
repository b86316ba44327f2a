"""The one internal shape every dataset format is read into.

A `Sample` is a list of image paths plus a list of turns. Images are referred to from the turn
text by the placeholder `IMAGE` ("<image>"), the k-th placeholder standing for `images[k]`.
Readers never "fix" a sample: a placeholder/image mismatch is kept as it is so that the
pre-flight check can report it with the file and record it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str  # may hold IMAGE placeholders


@dataclass
class Sample:
    images: list[str]  # absolute paths, in placeholder order
    turns: list[Turn]
    id: str | None = None
    source: str = ""  # "FILE:INDEX", used in every message about this sample
    meta: dict = field(default_factory=dict)  # extra fields a writer may want back (e.g. image_id)

    @property
    def placeholder_count(self) -> int:
        return sum(t.text.count(IMAGE) for t in self.turns)

    def answer(self) -> str:
        """Text of the last assistant turn: the reference for evaluation."""
        for turn in reversed(self.turns):
            if turn.role == "assistant":
                return turn.text
        return ""

    def prompt_turns(self) -> list[Turn]:
        """Turns before the last assistant turn: what a model is given at evaluation time."""
        last = max((i for i, t in enumerate(self.turns) if t.role == "assistant"), default=len(self.turns))
        return self.turns[:last]
