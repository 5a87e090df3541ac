"""Write the demo dataset for the embedded default model (SmolLM2-135M-Instruct).

Task: pull a person, a city and a date out of a short English sentence and answer with JSON
``{"name": ..., "city": ..., "date": "YYYY-MM-DD"}``. The dates are written in several surface forms
("March 15, 2024", "15/03/2024", "the 15th of March 2024", ...) and must be normalised to ISO in the
answer: what a tiny model gets wrong before fine-tuning and learns in a few hundred steps.

Rows use the ``context``/``target`` format of the seed workflow. The dev set is held out: its inputs
never occur in train, no (name, city) pair of dev occurs in train, and a third of dev uses sentence
templates that train never uses.

The files ship in the package beside the demo config (``src/glmtune/assets/demo/demo.yaml``, which
names them relative to itself), so ``glmtune demo`` finds them from an installed wheel too.

Deterministic (seeded), standard library only::

    python examples/make_demo_data.py            # writes src/glmtune/assets/demo/demo_{train,dev}.jsonl
    python examples/make_demo_data.py --seed 1 --n-train 800 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from pathlib import Path

#: The demo's folder in the package (its config and data).
DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "glmtune" / "assets" / "demo"

INSTRUCTION = (
    "Instruction: Extract the person, city and date from the text as JSON with keys name, city, "
    "date (YYYY-MM-DD).\nInput: {sentence}\nAnswer: "
)

FIRST_NAMES = [
    "Alice", "Bob", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kate", "Liam", "Maria", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara",
    "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Amir", "Bianca", "Chloe", "Dmitri",
    "Elena", "Felix", "Hannah", "Ivan", "Julia", "Kenji", "Lucia", "Mateo", "Nora", "Oscar",
]  # fmt: skip

LAST_NAMES = [
    "Chen", "Smith", "Garcia", "Okafor", "Muller", "Rossi", "Tanaka", "Kim", "Novak", "Silva",
    "Nguyen", "Patel", "Brown", "Ivanova", "Dubois", "Haddad", "Larsen", "Moreau", "Schmidt", "Lopez",
    "Khan", "Jensen", "Costa", "Wong", "Sato", "Fischer", "Mendes", "Kowalski", "Reyes", "Ali",
    "Becker", "Nakamura", "Santos", "Walsh", "Olsen", "Romero", "Yilmaz", "Park", "Taylor", "Weber",
]  # fmt: skip

CITIES = [
    "Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Berlin", "Madrid", "Seoul", "Toronto",
    "Sydney", "Mumbai", "Lagos", "Rome", "Vienna", "Dublin", "Lisbon", "Prague", "Warsaw", "Athens",
    "Bangkok", "Hanoi", "Istanbul", "Chicago", "Boston", "Denver", "Montreal", "Quito", "Bogota", "Santiago",
    "Helsinki", "Stockholm", "Zurich", "Munich", "Osaka", "Manila", "Jakarta", "New York", "Cape Town",
    "Buenos Aires",
]  # fmt: skip

# {name} {city} {date}; a sentence never starts with {date} (some date forms start with "the").
TRAIN_TEMPLATES = [
    "{name} flew to {city} on {date}.",
    "On {date}, {name} arrived in {city}.",
    "{name} speaks in {city} on {date}.",
    "The {city} fair on {date} had {name}.",
    "{name} moved to {city} on {date}.",
    "Meet {name} in {city} on {date}.",
    "{city} welcomed {name} on {date}.",
    "Dr. {name} signed in {city} on {date}.",
    "{name} was born in {city} on {date}.",
    "Reminder: {name} is in {city} on {date}.",
    "Last seen in {city} on {date}: {name}.",
    "A parcel for {name} left {city} {date}.",
]
DEV_ONLY_TEMPLATES = [
    "{name} ran the {city} marathon on {date}.",
    "Our guest on {date} is {name} from {city}.",
    "Flight: {name} to {city}, {date}.",
]

MONTHS = list(calendar.month_name)[1:]
MONTHS_ABBR = list(calendar.month_abbr)[1:]


def ordinal(day: int) -> str:
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Surface forms of a date; slashes and dots are always day/month/year.
DATE_FORMS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",  # March 15, 2024
    lambda y, m, d: f"{d:02d}/{m:02d}/{y}",  # 15/03/2024
    lambda y, m, d: f"the {ordinal(d)} of {MONTHS[m - 1]} {y}",  # the 15th of March 2024
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",  # 15 March 2024
    lambda y, m, d: f"{MONTHS_ABBR[m - 1]} {d}, {y}",  # Mar 15, 2024
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal(d)}, {y}",  # March 15th, 2024
    lambda y, m, d: f"{d:02d}.{m:02d}.{y}",  # 15.03.2024
    lambda y, m, d: f"{y}-{m:02d}-{d:02d}",  # 2024-03-15 (already ISO)
]


def make_row(rng: random.Random, template: str, first: str, last: str, city: str) -> tuple[dict, str]:
    y = rng.randint(2018, 2027)
    m = rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    date_text = rng.choice(DATE_FORMS)(y, m, d)
    name = f"{first} {last}"
    sentence = template.format(name=name, city=city, date=date_text)
    sentence = sentence[0].upper() + sentence[1:]
    target = json.dumps({"name": name, "city": city, "date": f"{y:04d}-{m:02d}-{d:02d}"})
    return {"context": INSTRUCTION.format(sentence=sentence), "target": target}, sentence


def build(seed: int, n_train: int, n_dev: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train: list[dict] = []
    seen_sentences: set[str] = set()
    seen_pairs: set[tuple[str, str]] = set()  # (full name, city) pairs used in train
    while len(train) < n_train:
        first, last, city = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(CITIES)
        row, sentence = make_row(rng, rng.choice(TRAIN_TEMPLATES), first, last, city)
        if sentence in seen_sentences:
            continue
        seen_sentences.add(sentence)
        seen_pairs.add((f"{first} {last}", city))
        train.append(row)
    dev: list[dict] = []
    n_dev_only = n_dev // 3
    while len(dev) < n_dev:
        first, last, city = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(CITIES)
        if (f"{first} {last}", city) in seen_pairs:
            continue
        templates = DEV_ONLY_TEMPLATES if len(dev) < n_dev_only else TRAIN_TEMPLATES
        row, sentence = make_row(rng, rng.choice(templates), first, last, city)
        if sentence in seen_sentences:
            continue
        seen_sentences.add(sentence)
        seen_pairs.add((f"{first} {last}", city))  # no pair twice within dev either
        dev.append(row)
    rng.shuffle(dev)
    return train, dev


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-dev", type=int, default=60)
    args = ap.parse_args(argv)
    train, dev = build(args.seed, args.n_train, args.n_dev)
    write_jsonl(args.out_dir / "demo_train.jsonl", train)
    write_jsonl(args.out_dir / "demo_dev.jsonl", dev)
    print(f"wrote {len(train)} train and {len(dev)} dev rows to {args.out_dir}")


if __name__ == "__main__":
    main()
