"""Writes the tiny synthetic tasks the tiny recipes and the tests use (MetaICL layout).

Run from the repository root, with mendctl installed (it names the files): python data/tiny/make_tiny_data.py
The output is committed; this script is how it was made and how to remake it.
"""
import json
import random
from pathlib import Path

from mendctl.data.metaicl import META_TRAIN_FILE, split_name

OUT = Path(__file__).parent
K, SEEDS, TEST = 4, (100, 13), 12

WORDS = {"good": ["great", "lovely", "fine", "superb", "nice", "happy"],
         "bad": ["awful", "poor", "dull", "sad", "nasty", "grim"]}
NOUNS = ["film", "meal", "book", "song", "trip", "game"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack"}


def sentiment(r):
    label = r.choice(["good", "bad"])
    return f"the {r.choice(NOUNS)} was {r.choice(WORDS[label])}", ("positive" if label == "good" else "negative"), ["positive", "negative"]


def parity(r):
    n = r.randrange(100)
    return f"number {n}", ("even" if n % 2 == 0 else "odd"), ["even", "odd"]


def color(r):
    thing = r.choice(sorted(COLORS))
    return f"the color of {thing}", COLORS[thing], sorted(set(COLORS.values()))


def sound(r):
    animal = r.choice(sorted(SOUNDS))
    return f"the {animal} says", SOUNDS[animal], sorted(SOUNDS.values())


def length(r):
    word = "".join(r.choice("abcdefgh") for _ in range(r.randint(1, 8)))
    return f"word {word}", ("long" if len(word) > 4 else "short"), ["short", "long"]


def compare(r):
    a, b = r.sample(range(50), 2)
    return f"{a} vs {b}", ("first" if a > b else "second"), ["first", "second"]


TASKS = {"tiny_sentiment": sentiment, "tiny_parity": parity, "tiny_color": color, "tiny_sound": sound,
         "tiny_length": length, "tiny_compare": compare}
TRAIN, TEST_TASKS = ["tiny_parity", "tiny_color", "tiny_sound", "tiny_length"], ["tiny_sentiment", "tiny_compare"]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main():
    for task, make in TASKS.items():
        r = random.Random(task)
        rows = [dict(zip(("input", "output", "options"), make(r)), task=task) for _ in range(40 + TEST + 2 * K)]
        test, pool = rows[:TEST], rows[TEST:]
        write(OUT / "tasks" / task / META_TRAIN_FILE.replace("{task}", task), pool)
        for seed in SEEDS:
            picked = random.Random(seed).sample(pool, 2 * K)
            for split, part in (("train", picked[:K]), ("dev", picked[K:]), ("test", test)):
                write(OUT / "tasks" / task / split_name(task, K, seed, split), part)
    partition = {"train": TRAIN, "test": TEST_TASKS, "task_types": {t: "classification" for t in TASKS}}
    (OUT / "partition.json").write_text(json.dumps(partition, indent=1) + "\n")


if __name__ == "__main__":
    main()
