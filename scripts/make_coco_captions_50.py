"""Write tests/data/coco_captions_50.json: 50 images, 5 reference captions and 1 candidate each.

    python scripts/make_coco_captions_50.py            # rewrites the file; same bytes every time

The captions read like COCO's (a subject, what it does, where, a detail) and carry what the
COCO tokenisation must get right: capitals, clitics (man's, isn't, they're, we'll), hyphenated
words (T-shirt, 10-year-old), numbers with . , : and /, abbreviations (Mr., St., U.S., p.m.),
quotes, brackets, ampersands, slashes and end punctuation. tests/test_coco_metrics.py scores the
set with pycocoevalcap and with vlmtune and compares.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco_captions_50.json"
SEED = 50

SUBJECTS = ["a man", "a woman", "a young boy", "a little girl", "two men", "a dog", "a black cat", "three people",
            "an old man", "a 10-year-old kid", "Mr. Smith", "a surfer", "the chef", "a group of kids", "a brown horse"]
ACTIONS = ["riding a bike", "holding an umbrella", "eating a hot-dog", "playing frisbee", "wearing a T-shirt",
           "sitting on a bench", "looking at a cell-phone", "throwing a ball", "carrying a surfboard",
           "cutting a pizza", "walking a dog", "flying a kite", "reading a newspaper", "drinking coffee"]
PLACES = ["on a busy street", "in the kitchen", "at the beach", "in a grassy field", "next to a double-decker bus",
          "near St. Mark's church", "in the U.S. capital", "inside a well-lit room", "by the lake", "on a snowy hill",
          "at 5:30 p.m.", "in front of a red/white sign", "under a big tree", "at a 24/7 diner"]
DETAILS = ["it's sunny", "there's a car behind", "the sky is blue", "nobody's watching", "they're smiling",
           "the man's hat is red", "it isn't raining", "we'll see more later", "a sign says \"STOP\"",
           "the price is $3.50", "about 1,000 people are there", "a 3.5-inch screen glows", "(it's late)",
           "cats & dogs play", "the dogs' toys lie around", "don't miss the 2nd kite", "someone's laughing"]
ENDINGS = [".", ".", ".", "", " .", "!", "...", "?"]


def phrase(rng: random.Random, scene: tuple[str, str, str, str]) -> str:
    """One caption of the scene: its parts in one of a few orders, with COCO-like noise."""
    subject, action, place, detail = scene
    if rng.random() < 0.3:
        subject = rng.choice(SUBJECTS)  # annotators disagree about who is in the picture
    forms = [f"{subject} {action} {place}", f"{subject} is {action} {place}", f"{place}, {subject} is {action}",
             f"{subject} {action} {place}; {detail}", f"{subject} {action}, {detail}"]
    text = rng.choice(forms)
    if rng.random() < 0.8:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text = text.upper()
    return text + rng.choice(ENDINGS)


def build() -> dict:
    rng = random.Random(SEED)
    images = []
    for image_id in range(1, 51):
        scene = (rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES), rng.choice(DETAILS))
        references = [phrase(rng, scene) for _ in range(5)]
        candidate = phrase(rng, scene) if rng.random() < 0.8 else phrase(rng, (scene[0], rng.choice(ACTIONS),
                                                                                   rng.choice(PLACES), scene[3]))
        images.append({"image_id": image_id, "references": references, "candidate": candidate})
    return {"about": "50 images x (5 references + 1 candidate); written by scripts/make_coco_captions_50.py",
            "images": images}


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
