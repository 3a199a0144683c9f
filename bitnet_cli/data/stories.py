"""A generator of simple made-up children's stories, in the TinyStories style and schema.

For trying the text experiments without the hub, and for the tests:

    bitnet stories stories/ --stories 5000            # stories/stories.jsonl
    bitnet stories stories/ --format parquet
    bitnet train tinystories --size tiny --data stories/

Each story is drawn from small word lists with a seed, so the text is varied but predictable
enough for a tiny model to learn in minutes; a model that has learned nothing scores the
unigram baseline, one that has learned the story shapes far below it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.store.files import write_bytes_atomic

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


FORMATS = ("jsonl", "parquet", "txt")


def write_stories(folder: Path, count: int, seed: int = 0, fmt: str = "jsonl") -> Path:
    """Write `count` stories as one file, stories.<fmt>, with a TinyStories-style `text` field;
    the file appears whole or not at all."""
    if fmt not in FORMATS:
        raise BitnetError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if count < 1:
        raise BitnetError(f"--stories must be at least 1, got {count}")
    folder = Path(folder)
    path = folder / f"stories.{fmt}"
    if folder.exists() and not folder.is_dir():
        raise BitnetError(f"{folder} is a file, not a folder; give a folder for the stories")
    rng = random.Random(seed)
    texts = [story(rng) for _ in range(count)]
    if fmt == "jsonl":
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    elif fmt == "txt":
        data = ("\n<|endoftext|>\n".join(texts) + "\n").encode()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), buffer)
        data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path
