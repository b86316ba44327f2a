"""Where a sample's image lives: a file path, or bytes embedded in a shard.

    from vlmtune.data.images import open_image
    with open_image(sample.images[0]) as im:
        w, h = im.size                    # the header only: no pixels decoded

`Sample.images` holds strings. An image read from a shard folder (`vlmtune data prepare
--shards`, `vlmtune/data/table.py`) is an `EmbeddedImage`: a `str` whose value names it
("SHARD:ROW/NAME", for messages and for grouping records by image) and whose `data` is the
encoded file. Every module that reads image pixels or bytes goes through `open_image` and
`image_digest`, so both kinds work everywhere; a plain path stays a plain `str`.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image


class EmbeddedImage(str):
    """An image held in memory: the string names it, `data` is its encoded bytes (PNG, JPEG, ...)."""

    data: bytes

    def __new__(cls, name: str, data: bytes):
        self = super().__new__(cls, name)
        self.data = data
        return self

    def __reduce__(self):  # DataLoader workers and check workers receive samples pickled
        return EmbeddedImage, (str(self), self.data)


def open_image(ref: str) -> Image.Image:
    """`Image.open` of a path or an `EmbeddedImage` (lazy: only the header is read here)."""
    if isinstance(ref, EmbeddedImage):
        return Image.open(io.BytesIO(ref.data))
    return Image.open(ref)


def image_digest(ref: str) -> bytes:
    """sha256 of the image's encoded bytes (a file is read in blocks); raises OSError if unreadable."""
    if isinstance(ref, EmbeddedImage):
        return hashlib.sha256(ref.data).digest()
    h = hashlib.sha256()
    with open(ref, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()
