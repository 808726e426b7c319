"""The demo's knowledge: a corpus of short passages about fictional people, towns and organisations, generated
deterministically from a seed, with train/dev/test questions split by entity (test facts are never trained on)."""

from __future__ import annotations

import dataclasses
import random

# Invented names are built from these pieces, so no pretrained model can know any fact about them.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "h", "br", "dr", "tr", "th",
           "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "nd", "x"]
_PLACE_SUFFIXES = ["", "", "", "holm", "ford", "wick", "dale", "mere", "stead", "ton", "by"]
_ORG_KINDS = ["Guild", "Company", "Society", "Institute", "League", "Foundation", "Trust", "Academy"]
_OCCUPATIONS = ["weaver", "cartographer", "brewer", "glassblower", "astronomer", "ferryman", "locksmith",
                "botanist", "clockmaker", "shipwright", "tanner", "potter", "surveyor", "printer", "beekeeper",
                "stonemason", "chemist", "violinist", "lawyer", "physician", "archivist", "miner", "sculptor",
                "merchant"]
_PRODUCTS = ["salt", "wool", "glass", "copper", "cheese", "timber", "silk", "tin", "honey", "paper", "clay",
             "amber", "rope", "pearls", "barley", "lace", "iron", "cider", "dye", "marble"]
_RIVER_WORDS = ["River", "River", "Water", "Brook"]

# Passage sentences: several phrasings per fact so a question is rarely a paraphrase of its passage.
_PERSON_EARLY = [
    "{name} was born in {birthplace} in {birth_year}, the child of a {parent_job}.",
    "Born in {birth_year} to a {parent_job}, {name} spent a childhood in the streets of {birthplace}.",
    "{name} came into the world at {birthplace} in the year {birth_year}; the family were {parent_job}s.",
    "In {birth_year} a {parent_job} in {birthplace} welcomed a child, {name}.",
]
_PERSON_CAREER = [
    "{name} worked as a {occupation} for the {employer} and later settled in {residence}.",
    "A {occupation} by trade, {name} served the {employer} for many years before retiring to {residence}.",
    "{name} made a living as a {occupation}, first with the {employer} and then from a house in {residence}.",
    "After joining the {employer} as a {occupation}, {name} moved to {residence}.",
]
_PLACE_GEO = [
    "{name} is a town on the banks of the {river} with a population of {population}.",
    "The {river} flows through {name}, a town of {population} inhabitants.",
    "{name} lies where the {river} bends; {population} people live there today.",
    "Home to {population} residents, {name} stands beside the {river}.",
]
_PLACE_HISTORY = [
    "{name} was founded in {founded} and is famous for its {product}.",
    "Settlers established {name} in {founded}; the town grew rich on {product}.",
    "Since its founding in {founded}, {name} has traded mainly in {product}.",
    "The {product} of {name} is known far and wide; the town dates from {founded}.",
]
_ORG_ORIGIN = [
    "The {name} was founded in {founded} by {founder} in the town of {hq}.",
    "{founder} established the {name} in {founded}, with its seat in {hq}.",
    "In {founded}, {founder} created the {name}; it is headquartered in {hq}.",
    "The {name}, based in {hq}, traces its origins to {founder} in {founded}.",
]
_ORG_TODAY = [
    "Today the {name} has {members} members and publishes a yearly almanac.",
    "The {name} counts {members} members, who meet every spring.",
    "With {members} members, the {name} is among the larger bodies of its kind.",
    "Membership of the {name} stands at {members}.",
]

# Questions: (attribute, passage part, phrasings). Phrasings avoid the passages' wording where they can.
_QUESTIONS = {
    "person": [
        ("birthplace", 0, ["Where was {name} born?", "What is the birthplace of {name}?",
                           "In which town did {name} grow up?", "{name} is a native of which town?"]),
        ("birth_year", 0, ["In what year was {name} born?", "When was {name} born?",
                           "What is the birth year of {name}?"]),
        ("occupation", 1, ["What was the profession of {name}?", "What job did {name} do?",
                           "What was {name}'s trade?"]),
        ("employer", 1, ["Which organisation employed {name}?", "For which body did {name} work?",
                         "Who was {name}'s employer?"]),
        ("residence", 1, ["Where did {name} retire to?", "In which town did {name} spend later life?",
                          "Where did {name} settle?"]),
    ],
    "place": [
        ("population", 0, ["How many people live in {name}?", "What is the population of {name}?",
                           "How large is the population of {name}?"]),
        ("river", 0, ["Which river runs through {name}?", "On what river is {name} located?",
                      "What river is {name} near?"]),
        ("founded", 1, ["When was {name} founded?", "In what year was {name} settled?",
                        "How old is {name}: what year was it founded?"]),
        ("product", 1, ["What is {name} known for?", "What does {name} trade in?",
                        "What product made {name} rich?"]),
    ],
    "org": [
        ("founded", 0, ["When was the {name} established?", "In what year did the {name} begin?",
                        "What is the founding year of the {name}?"]),
        ("founder", 0, ["Who founded the {name}?", "Who started the {name}?", "Who created the {name}?"]),
        ("hq", 0, ["Where is the {name} based?", "In which town is the {name} headquartered?",
                   "Where does the {name} have its seat?"]),
        ("members", 1, ["How many members does the {name} have?", "What is the membership of the {name}?",
                        "How big is the {name}?"]),
    ],
}


@dataclasses.dataclass
class DemoCorpus:
    """passages: [{"id", "title", "text"}]; train/dev/test: [{"question", "answers": [str], "passage_id",
    "entity", "attribute"}]; test entities never occur as the subject of a train or dev question."""

    passages: list[dict]
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    seed: int

    def passage(self, passage_id: str) -> dict:
        if not hasattr(self, "_by_id"):
            self._by_id = {p["id"]: p for p in self.passages}
        return self._by_id[passage_id]


class _Names:
    """Unique invented names; a share of them deliberately near-duplicates of earlier ones (shared surname,
    last syllable changed) so that retrieval has look-alike distractors."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()
        self.syllables: dict[str, list[str]] = {}  # word -> the syllables it was built from

    def syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def word(self, n_syll: int) -> str:
        parts = [self.syllable() for _ in range(n_syll)]
        word = "".join(parts).capitalize()
        self.syllables[word] = parts
        return word

    def variant(self, word: str) -> str:
        """`word` with its last syllable replaced: "Velduns" -> "Veldor"; a look-alike for the encoder."""
        parts = self.syllables[word][:-1] + [self.syllable()]
        new = "".join(parts).capitalize()
        self.syllables[new] = parts
        return new

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used and len(name) >= 4:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted; lower the entity counts")


def _number(rng: random.Random, lo: int, hi: int) -> str:
    return str(rng.randint(lo, hi))


def generate_corpus(seed: int = 0, n_people: int = 700, n_places: int = 300, n_orgs: int = 200,
                    dev_fraction: float = 0.1, test_fraction: float = 0.2, variety: int = 4) -> DemoCorpus:
    """Generates the demo corpus: two passages per entity ((n_people + n_places + n_orgs) * 2 in all) and one
    question per (entity, attribute), each answer a verbatim span of its gold passage. Entities are split
    train/dev/test by `dev_fraction` / `test_fraction`. variety (1-4): how many phrasings of each passage sentence
    and of each question are drawn from (fewer: a world a small generator learns to read in fewer steps).
    Same arguments -> identical output."""
    for arg, val in (("n_people", n_people), ("n_places", n_places), ("n_orgs", n_orgs)):
        if not isinstance(val, int) or val < 3:
            raise ValueError(f"{arg} must be an int >= 3, got {val!r}")
    if not isinstance(variety, int) or not 1 <= variety <= 4:
        raise ValueError(f"variety must be an int in [1, 4], got {variety!r}")
    if not (0 < dev_fraction < 1 and 0 < test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise ValueError(f"need 0 < dev_fraction, test_fraction and their sum < 1, got {dev_fraction=}, "
                         f"{test_fraction=}")
    rng = random.Random(seed)
    names = _Names(rng)

    def pick(phrasings: list[str]) -> str:
        return rng.choice(phrasings[:variety])


    # Places first: people and organisations refer to them.
    places = []
    for i in range(n_places):
        if i and rng.random() < 0.3:  # look-alike of an earlier town: same suffix, stem one syllable off
            base = rng.choice(places)
            stem, suffix = base["stem"], base["suffix"]
        else:
            stem, suffix = names.word(rng.choice([2, 2, 3])), rng.choice(_PLACE_SUFFIXES)
        name = names.unique(lambda stem=stem, suffix=suffix: names.variant(stem) + suffix)
        places.append({"name": name, "stem": name[: len(name) - len(suffix)], "suffix": suffix})
    river_names = [names.unique(lambda: names.word(2)) + " " + rng.choice(_RIVER_WORDS)
                   for _ in range(max(3, n_places // 3))]
    for p in places:
        p.update(population=_number(rng, 800, 99000), river=rng.choice(river_names),
                 founded=_number(rng, 1100, 1899), product=rng.choice(_PRODUCTS))

    people = []
    for i in range(n_people):
        if i and rng.random() < 0.35:  # family member: same surname, new first name
            surname = rng.choice(people)["name"].split(" ")[1]
            name = names.unique(lambda s=surname: names.word(2) + " " + s)
        elif i and rng.random() < 0.2:  # look-alike: same first name, surname one syllable off
            first, last = rng.choice(people)["name"].split(" ")
            name = names.unique(lambda f=first, s=last: f + " " + names.variant(s))
        else:
            name = names.unique(lambda: names.word(2) + " " + names.word(rng.choice([2, 3])))
        people.append({"name": name})

    orgs = []
    for i in range(n_orgs):
        if i and rng.random() < 0.3:
            base = rng.choice(orgs)["name"].split(" ")
            name = names.unique(lambda b=base: names.variant(b[0]) + " " + b[1])
        else:
            name = names.unique(lambda: names.word(rng.choice([2, 3])) + " " + rng.choice(_ORG_KINDS))
        orgs.append({"name": name})
    for o in orgs:
        o.update(founded=_number(rng, 1300, 1950), founder=rng.choice(people)["name"],
                 hq=rng.choice(places)["name"], members=_number(rng, 12, 9000))
    for p in people:
        birthplace, residence = rng.sample(places, 2)
        p.update(birthplace=birthplace["name"], residence=residence["name"], birth_year=_number(rng, 1500, 1980),
                 occupation=rng.choice(_OCCUPATIONS), employer=rng.choice(orgs)["name"],
                 parent_job=rng.choice(_OCCUPATIONS))

    entities = ([("person", e) for e in people] + [("place", e) for e in places] + [("org", e) for e in orgs])
    passages: list[dict] = []
    questions: list[tuple[str, dict]] = []  # (entity name, question)
    for kind, e in entities:
        if kind == "person":
            texts = [pick(_PERSON_EARLY).format(**e), pick(_PERSON_CAREER).format(**e)]
        elif kind == "place":
            texts = [pick(_PLACE_GEO).format(**e), pick(_PLACE_HISTORY).format(**e)]
        else:
            texts = [pick(_ORG_ORIGIN).format(**e), pick(_ORG_TODAY).format(**e)]
        ids = []
        for text in texts:
            pid = f"p{len(passages):05d}"
            passages.append({"id": pid, "title": e["name"], "text": text})
            ids.append(pid)
        for attr, part, phrasings in _QUESTIONS[kind]:
            answer = e[attr]
            assert answer in texts[part], (answer, texts[part])
            questions.append((e["name"], {"question": pick(phrasings).format(name=e["name"]),
                                          "answers": [answer], "passage_id": ids[part], "entity": e["name"],
                                          "attribute": f"{kind}.{attr}"}))

    # Split by entity, so the facts of a test entity never appear among training answers.
    order = [e["name"] for _, e in entities]
    rng.shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    n_dev = max(1, round(len(order) * dev_fraction))
    split_of = {n: "test" for n in order[:n_test]}
    split_of.update({n: "dev" for n in order[n_test:n_test + n_dev]})
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for name, q in questions:
        splits[split_of.get(name, "train")].append(q)
    for qs in splits.values():
        rng.shuffle(qs)
    return DemoCorpus(passages=passages, train=splits["train"], dev=splits["dev"], test=splits["test"], seed=seed)
