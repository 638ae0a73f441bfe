"""Generate the bundled SYNTHETIC sample (items.csv, interactions.csv): series a small model can learn.

Run `python sample_data/generate.py`; the fixed seed makes the output byte-identical on every run.
Stdlib only, so the sample can be rebuilt without the project's dependencies.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["SEED", "SERIES_RULE_PROBABILITY", "main"]

SEED = 20240611
USER_COUNT = 600
STANDALONE_PER_GENRE = 22
# The main learnable signal. With this probability the next item follows the series rule: the next
# instalment of the most recently touched series that has one, or, when no series is open, instalment 1
# of a new series (about a fifth of the firings). So about 65% of all next items continue a series
# seen in the history, which is what a model can learn to predict.
SERIES_RULE_PROBABILITY = 0.8
MIN_LENGTH, MAX_LENGTH, MEAN_EXTRA_LENGTH = 5, 50, 12
FIRST_TIME = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
LAST_TIME = int(datetime(2024, 12, 31, tzinfo=UTC).timestamp())
MIN_GAP_S, MAX_GAP_S = 30 * 60, 5 * 24 * 3600

# Two or three words each, no word shared between two series, so a name points at one series only.
SERIES_NAMES = {
    "sci-fi": ["Star Quest", "Nebula Drift", "Quantum Rangers", "Galaxy Outlaws", "Cyber Dawn",
               "Planet Forge", "Photon Legion", "Astro Pilots", "Comet Patrol"],
    "fantasy": ["Dragon Crown", "Elven Gate", "Wizard Academy", "Shadow Blade", "Mystic Isles",
                "Rune Keepers", "Griffin Riders", "Crystal Kingdom", "Goblin Market"],
    "mystery": ["Inspector Finch", "Midnight Clues", "Raven Manor", "Cipher Society", "Velvet Alibi",
                "Harbor Murders", "Lady Holloway", "Locked Room Files", "Copper Key Club"],
    "romance": ["Summer Letters", "Paris Hearts", "Vineyard Vows", "Coastal Kisses", "Moonlit Waltz",
                "Rosewood Diaries", "Honey Creek", "Cherry Blossom Promise", "Lakeside Bakery"],
    "comedy": ["Office Pranksters", "Crazy Cousins", "Pizza Brothers", "Holiday Mayhem", "Neighbor Wars",
               "Banana Squad", "Camp Chaos", "Wacky Wedding", "Robot Butler"],
    "horror": ["Crimson Hollow", "Blood Harvest", "Haunted Asylum", "Zombie Outbreak", "Witch Cellar",
               "Creeping Fog", "Bone Church", "Night Howlers", "Cursed Tape"],
    "western": ["Dusty Trails", "Silver Canyon", "Rattlesnake Pass", "Sheriff Dalton", "Gold Rush Town",
                "Tumbleweed Saloon", "Frontier Justice", "Iron Horse", "Bandit Ridge"],
    "thriller": ["Agent Cobalt", "Silent Protocol", "Deadline Berlin", "Red Ledger", "Vault Heist",
                 "Burning Bridge", "Double Cross", "Sniper Code", "Blackout Signal"],
}
GENRES = list(SERIES_NAMES)

# Standalone titles combine a genre's adjectives and nouns; none of these words is in a series name.
STANDALONE_WORDS = {
    "sci-fi": (["Distant", "Binary", "Frozen", "Lunar", "Solar", "Electric"],
               ["Android", "Horizon", "Colony", "Reactor", "Satellite", "Voyager"]),
    "fantasy": (["Enchanted", "Ancient", "Golden", "Emerald", "Forgotten", "Wandering"],
                ["Forest", "Sword", "Oracle", "Tower", "Unicorn", "Chalice"]),
    "mystery": (["Missing", "Quiet", "Hidden", "Vanishing", "Stolen", "Unseen"],
                ["Witness", "Portrait", "Staircase", "Clock", "Footprint", "Lighthouse"]),
    "romance": (["Sweet", "Tender", "Secret", "Autumn", "Starlit", "Gentle"],
                ["Embrace", "Romance", "Garden", "Melody", "Proposal", "Sunset"]),
    "comedy": (["Silly", "Lucky", "Clumsy", "Grumpy", "Awkward", "Noisy"],
               ["Roommate", "Vacation", "Uncle", "Parrot", "Dentist", "Mascot"]),
    "horror": (["Bleeding", "Rotten", "Screaming", "Wretched", "Ghastly", "Hungry"],
               ["Attic", "Doll", "Scarecrow", "Mirror", "Basement", "Orphanage"]),
    "western": (["Lonesome", "Rusty", "Wild", "Desert", "Crooked", "Broken"],
                ["Stagecoach", "Gunslinger", "Ranch", "Bounty", "Mesa", "Spur"]),
    "thriller": (["Deadly", "Covert", "Rogue", "Hostile", "Fatal", "Shattered"],
                 ["Dossier", "Target", "Hostage", "Exchange", "Informant", "Conspiracy"]),
}

# Summary parts per genre: who, what and where, so each item gets a distinct one-sentence plot.
PLOTS = {
    "sci-fi": (["a rookie pilot", "a stranded crew", "a rogue android", "a young engineer"],
               ["must stop a rebel AI", "races to repair a dying starship", "decodes an alien message",
                "defends a mining outpost"],
               ["on a distant moon", "aboard a generation ship", "at the edge of the galaxy",
                "in a drowned future city"]),
    "fantasy": (["an exiled princess", "a reluctant apprentice", "a band of thieves", "an old knight"],
                ["hunts for a stolen relic", "breaks an ancient curse", "tames a wild beast",
                 "leads a rebellion against a tyrant"],
                ["in a kingdom of floating islands", "beneath a haunted mountain", "across a frozen realm",
                 "in a city of talking ravens"]),
    "mystery": (["a retired detective", "a curious librarian", "a young reporter", "a country doctor"],
                ["investigates a poisoning", "follows a trail of coded notes", "solves a decades-old theft",
                 "unmasks a blackmailer"],
                ["in a snowbound hotel", "in a sleepy seaside village", "at a grand country estate",
                 "in foggy Victorian London"]),
    "romance": (["a shy florist", "a busy chef", "a travelling violinist", "a small-town teacher"],
                ["falls for a rival", "reunites with a first love", "plans a best friend's wedding",
                 "inherits a house and a grumpy neighbour"],
                ["in a sunny Italian village", "during a snowy winter festival", "on a Scottish island",
                 "in a bustling New York bakery"]),
    "comedy": (["a hapless intern", "a clumsy substitute teacher", "an overconfident salesman",
                "a retired clown"],
               ["tries to win a talent show", "accidentally swaps identities",
                "survives a disastrous road trip", "throws the worst party in history"],
               ["in a chaotic summer camp", "at a cursed family reunion", "in a failing theme park",
                "on a cruise that goes wrong"]),
    "horror": (["a group of students", "a grieving widow", "a night-shift nurse", "a paranormal blogger"],
               ["is stalked by something in the walls", "wakes an old evil", "hears voices no one else hears",
                "cannot escape a recurring nightmare"],
               ["in an abandoned hospital", "in a remote farmhouse", "in a town that vanished from maps",
                "in a lake cabin at midnight"]),
    "western": (["a weary marshal", "a young gunslinger", "a widowed rancher", "a travelling preacher"],
                ["hunts a notorious outlaw", "defends a homestead from land grabbers",
                 "escorts gold across the desert", "seeks revenge for a betrayal"],
                ["in a lawless border town", "along the old railroad", "in the badlands of Arizona",
                 "during a brutal winter drive"]),
    "thriller": (["a disgraced spy", "a hacker on the run", "an honest accountant", "a bodyguard"],
                 ["uncovers a plot to crash the markets", "must clear a framed name within a day",
                  "protects a witness from assassins", "races to stop a bombing"],
                 ["in rain-soaked Berlin", "across three European capitals", "inside a locked-down embassy",
                  "aboard a night train"]),
}

ROMAN = ["I", "II", "III", "IV", "V", "VI"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
# How instalment numbers are written: the style also decides the medium named in the caption.
NUMBER_STYLES = [("roman", "film"), ("roman", "film"), ("part", "film"), ("book", "novel")]


@dataclass
class SampleItem:
    """An item before ids are assigned; series is None for standalone items."""

    title: str
    genre: str
    caption: str
    summary: str
    series: str | None = None
    instalment: int = 0  # 1-based position in the series


def main(out_dir: Path | None = None) -> None:
    """Write items.csv and interactions.csv (bundled format) into out_dir, by default beside this script."""
    out_dir = Path(__file__).resolve().parent if out_dir is None else Path(out_dir)
    _check_word_lists()
    rng = random.Random(SEED)
    items = _make_items(rng)
    rng.shuffle(items)  # ids carry no hint of series order
    ids = {item.title: f"i{number:04d}" for number, item in enumerate(items, 1)}
    if len(ids) != len(items):
        raise ValueError("two items share a title: a model could not tell them apart")
    by_series: dict[str, list[SampleItem]] = {}
    for item in sorted(items, key=lambda item: item.instalment):
        if item.series is not None:
            by_series.setdefault(item.series, []).append(item)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "items.csv").open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["item_id", "title", "caption", "summary"])
        for item in items:
            writer.writerow([ids[item.title], item.title, item.caption, item.summary])
    with (out_dir / "interactions.csv").open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp"])
        for number in range(1, USER_COUNT + 1):
            sequence = _user_sequence(rng, items, by_series)
            for item, timestamp in zip(sequence, _timestamps(rng, len(sequence)), strict=True):
                writer.writerow([f"u{number:04d}", ids[item.title], timestamp])


def _check_word_lists() -> None:
    """Fail loudly if an edit makes two series share a word or a standalone title reuse a series word."""
    seen: dict[str, str] = {}
    for names in SERIES_NAMES.values():
        for name in names:
            for word in name.split():
                if word in seen:
                    raise ValueError(f"series {name!r} and {seen[word]!r} share the word {word!r}")
                seen[word] = name
    for adjectives, nouns in STANDALONE_WORDS.values():
        clashes = [word for word in adjectives + nouns if word in seen]
        if clashes:
            raise ValueError(f"standalone words {clashes} also appear in series names")


def _make_items(rng: random.Random) -> list[SampleItem]:
    items: list[SampleItem] = []
    for genre, names in SERIES_NAMES.items():
        who, what, where = PLOTS[genre]
        for name in names:
            style, medium = rng.choice(NUMBER_STYLES)
            hero = rng.choice(who)  # a series keeps its protagonist, as real series do
            for number in range(1, rng.randint(3, 6) + 1):
                suffix = {"roman": ROMAN[number - 1], "part": f"Part {number}",
                          "book": f"Book {number}"}[style]
                ordinal = ORDINALS[number - 1]
                items.append(SampleItem(
                    title=f"{name} {suffix}", genre=genre,
                    caption=f"A {genre} {medium}, {ordinal} in the {name} series",
                    summary=f"In the {ordinal} {name} story, {hero} {rng.choice(what)} {rng.choice(where)}.",
                    series=name, instalment=number))
    for genre, (adjectives, nouns) in STANDALONE_WORDS.items():
        who, what, where = PLOTS[genre]
        pairs = rng.sample([(adjective, noun) for adjective in adjectives for noun in nouns],
                           STANDALONE_PER_GENRE)
        for adjective, noun in pairs:
            medium = "film" if rng.random() < 0.7 else "novel"
            title = f"The {adjective} {noun}" if rng.random() < 0.5 else f"{adjective} {noun}"
            plot = f"{rng.choice(who)} {rng.choice(what)} {rng.choice(where)}."
            items.append(SampleItem(title=title, genre=genre, caption=f"A standalone {genre} {medium}",
                                    summary=plot[0].upper() + plot[1:]))
    return items


def _user_sequence(rng: random.Random, items: list[SampleItem],
                   by_series: dict[str, list[SampleItem]]) -> list[SampleItem]:
    """One user's items in time order: mostly 'next instalment of the latest open series', else taste."""
    favourites = rng.sample(GENRES, 1 if rng.random() < 0.4 else 2)
    length = min(MAX_LENGTH, MIN_LENGTH + int(rng.expovariate(1 / MEAN_EXTRA_LENGTH)))
    touched: list[SampleItem] = []
    touched_titles: set[str] = set()  # membership only, never iterated: the output stays deterministic
    # Series in the order they were last touched, with the highest instalment seen so far.
    progress: dict[str, int] = {}
    while len(touched) < length:
        if rng.random() < SERIES_RULE_PROBABILITY:
            item = _continuation(rng, progress, by_series, favourites)
        else:
            # Taste: a standalone item or a series' first instalment (people rarely start at part 4).
            untouched = [item for item in items if item.title not in touched_titles and item.instalment <= 1]
            item = rng.choice([item for item in untouched if item.genre in favourites] or untouched)
        touched.append(item)
        touched_titles.add(item.title)
        if item.series is not None:
            highest = max(progress.pop(item.series, 0), item.instalment)
            progress[item.series] = highest  # re-inserted last: the most recently touched series
    return touched


def _continuation(rng: random.Random, progress: dict[str, int], by_series: dict[str, list[SampleItem]],
                  favourites: list[str]) -> SampleItem:
    """The next instalment of the most recently touched unfinished series, else a new series' first."""
    for series in reversed(progress):
        instalments = by_series[series]
        if progress[series] < len(instalments):
            return instalments[progress[series]]
    unstarted = [instalments[0] for series, instalments in by_series.items() if series not in progress]
    preferred = [item for item in unstarted if item.genre in favourites]
    return rng.choice(preferred or unstarted)


def _timestamps(rng: random.Random, count: int) -> list[int]:
    """Strictly increasing unix seconds inside 2020-2024, a half hour to five days apart."""
    gaps = [rng.randint(MIN_GAP_S, MAX_GAP_S) for _ in range(count - 1)]
    start = rng.randint(FIRST_TIME, LAST_TIME - sum(gaps))
    stamps = [start]
    for gap in gaps:
        stamps.append(stamps[-1] + gap)
    return stamps


if __name__ == "__main__":
    main()
