"""A generator of simple made-up children's stories, in the TinyStories style and schema.

For trying the text experiments without the hub, and for the tests:

    python -m bitnet_cli.storygen stories/ --stories 5000            # stories/stories.jsonl
    python -m bitnet_cli.storygen stories/ --format parquet
    bitnet train tinystories --size tiny --data stories/

Each story is drawn from small word lists with a seed, so the text is varied but predictable
enough for a tiny model to learn in minutes; a model that has learned nothing scores the
unigram baseline, one that has learned the story shapes far below it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "bear", "fox"]
PLACES = ["park", "garden", "forest", "beach", "yard", "farm", "pond", "hill"]
THINGS = ["ball", "kite", "box", "hat", "boat", "flower", "shell", "stick"]
COLOURS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "excited"]
FRIENDS = ["mom", "dad", "friend", "sister", "brother", "grandma"]


def story(rng: random.Random) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    thing, colour, feeling = rng.choice(THINGS), rng.choice(COLOURS), rng.choice(FEELINGS)
    friend = rng.choice(FRIENDS)
    opening = rng.choice([
        f"Once upon a time, there was a little {animal} named {name}.",
        f"One day, a {animal} named {name} went to the {place}.",
        f"There was a {colour} {animal} called {name}.",
    ])
    middle = rng.choice([
        f"{name} liked to play in the {place}. One day, {name} found a {colour} {thing}.",
        f"{name} saw a {colour} {thing} near the {place}. {name} wanted to play with it.",
        f"In the {place}, {name} lost a {thing}. {name} felt {feeling}.",
    ])
    turn = rng.choice([
        f"{name} asked the {friend} for help. The {friend} said, \"Let's look together.\"",
        f"Then the {friend} came to the {place} and smiled at {name}.",
        f"{name} ran home to tell the {friend} about the {thing}.",
    ])
    ending = rng.choice([
        f"They played with the {thing} all day, and {name} was {feeling}.",
        f"At the end of the day, {name} went home and slept. The end.",
        f"{name} learned that sharing makes everyone happy.",
    ])
    return " ".join([opening, middle, turn, ending])


def write_stories(folder: Path, count: int, seed: int = 0, fmt: str = "jsonl") -> Path:
    """Write `count` stories as one file with a TinyStories-style `text` field."""
    rng = random.Random(seed)
    texts = [story(rng) for _ in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"stories.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif fmt == "txt":
        path.write_text("\n<|endoftext|>\n".join(texts) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bitnet_cli.storygen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--stories", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["jsonl", "parquet", "txt"], default="jsonl")
    args = parser.parse_args()
    path = write_stories(args.folder, args.stories, args.seed, args.format)
    print(f"wrote {args.stories} stories to {path}")


if __name__ == "__main__":
    main()
