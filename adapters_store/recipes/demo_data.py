"""Training data for the demo adapters, generated from `demo_facts.py`; no downloads.

Each sample is a `Fact`: an English question with an English and a French answer.
A style turns a fact into the assistant answer the adapter must learn:

- `french`: the French answer;
- `json`:   `{"answer": "<English answer>"}` (json.dumps, so always parseable);
- `pirate`: the English answer rewritten by `piratify` ("Arr, matey! ...").

Question types are mixed (open questions, definitions, facts, arithmetic, lists)
so the adapter learns the style, not one answer shape. Everything is drawn from a
seeded `random.Random`, so the same seed gives the same data.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

import demo_facts as F

STYLES = ("french", "json", "pirate")


@dataclass(frozen=True)
class Fact:
    """One question with its English and French answers."""

    question: str
    en: str
    fr: str


# ---------------------------------------------------------------- question generators


def _an(noun: str) -> str:
    """English indefinite article for `noun`."""
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _join_en(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


def _join_fr(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " et " + items[-1]


def _capital(rng: random.Random) -> Fact:
    country, city, de_pays, ville = rng.choice(F.CAPITALS)
    q = rng.choice(["What is the capital of {c}?", "What's the capital city of {c}?",
                    "Tell me the capital of {c}.", "Which city is the capital of {c}?"]).format(c=country)
    return Fact(q, f"The capital of {country} is {city}.", f"La capitale {de_pays} est {ville}.")


def _arithmetic(rng: random.Random) -> Fact:
    op = rng.choice(["plus", "minus", "times"])
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    if op == "minus" and b > a:
        a, b = b, a  # keep results non-negative: simpler sentences
    c = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    q = rng.choice({
        "plus": ["What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."],
        "minus": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}."],
        "times": ["What is {a} times {b}?", "What is {a} multiplied by {b}?", "What is {a} x {b}?"],
    }[op]).format(a=a, b=b)
    fr_op = {"plus": "plus", "minus": "moins", "times": "fois"}[op]
    if max(a, b, c) <= 10 and rng.random() < 0.5:  # small numbers read naturally as words
        fa, fb, fc = (F.NUMBER_WORDS_FR[n] for n in (a, b, c))
        fr = f"{fa.capitalize()} {fr_op} {fb} font {fc}."
    else:
        fr = rng.choice([f"{a} {fr_op} {b} font {c}.", f"{a} {fr_op} {b} égale {c}.", f"La réponse est {c}."])
    en = rng.choice([f"{a} {op} {b} equals {c}.", f"{a} {op} {b} is {c}.", f"The answer is {c}."])
    return Fact(q, en, fr)


def _color_of(rng: random.Random) -> Fact:
    thing, en, fr = rng.choice(F.COLORS_OF_THINGS)
    q = rng.choice(["What color is {t}?", "What colour is {t}?", "Which color is {t}?"]).format(t=thing)
    return Fact(q, en, fr)


def _list_items(rng: random.Random) -> Fact:
    en_cat, fr_cat, items = F.CATEGORIES[rng.choice(sorted(F.CATEGORIES))]
    n = rng.choice([2, 3, 3, 4])
    picked = rng.sample(items, n)
    q = rng.choice(["Name {n} {c}.", "List {n} {c}.", "Can you name {n} {c}?", "Give me {n} {c}."])
    q = q.format(n=F.NUMBER_WORDS_EN[n], c=en_cat)
    en = f"Here are {F.NUMBER_WORDS_EN[n]} {en_cat}: {_join_en([e for e, _ in picked])}."
    fr = f"Voici {F.NUMBER_WORDS_FR[n]} {fr_cat} : {_join_fr([f for _, f in picked])}."
    return Fact(q, en, fr)


def _animal_sound(rng: random.Random) -> Fact:
    animal, en, fr = rng.choice(F.ANIMAL_SOUNDS)
    q = rng.choice(["What sound does {a} make?", "What noise does {a} make?", "What does {a} say?"])
    return Fact(q.format(a=_an(animal)), en, fr)


def _definition(rng: random.Random) -> Fact:
    phrase, en, fr = rng.choice(F.DEFINITIONS)
    word = phrase.split()[-1].lower()
    q = rng.choice(["What is {p}?", "Define {w}.", "What does the word '{w}' mean?", "Explain what {p} is."])
    return Fact(q.format(p=phrase, w=word), en, fr)


def _opposite(rng: random.Random) -> Fact:
    word, opp, mot, contraire = rng.choice(F.OPPOSITES)
    q = rng.choice(["What is the opposite of {w}?", "What's the opposite of '{w}'?",
                    "Give me the opposite of {w}."]).format(w=word)
    return Fact(q, f"The opposite of {word} is {opp}.", f"Le contraire de « {mot} » est « {contraire} ».")


def _calendar(rng: random.Random) -> Fact:
    if rng.random() < 0.5:
        i = rng.randrange(len(F.DAYS))
        (day, jour), (nxt, suivant) = F.DAYS[i], F.DAYS[(i + 1) % len(F.DAYS)]
        q = rng.choice(["What day comes after {d}?", "What is the day after {d}?"]).format(d=day)
        return Fact(q, f"The day after {day} is {nxt}.", f"Après {jour}, c'est {suivant}.")
    i = rng.randrange(len(F.MONTHS))
    (month, mois), (nxt, suivant) = F.MONTHS[i], F.MONTHS[(i + 1) % len(F.MONTHS)]
    q = rng.choice(["Which month comes after {m}?", "What month is after {m}?"]).format(m=month)
    return Fact(q, f"The month after {month} is {nxt}.", f"Après {mois} vient {suivant}.")


def _table(rows: list[tuple[str, str, str]]) -> Callable[[random.Random], Fact]:
    return lambda rng: Fact(*rng.choice(rows))


# (generator, weight): open questions dominate so the style carries over to any topic.
GENERATORS: list[tuple[Callable[[random.Random], Fact], float]] = [
    (_table(F.OPEN_QA), 0.34),
    (_definition, 0.10),
    (_capital, 0.09),
    (_arithmetic, 0.10),
    (_list_items, 0.10),
    (_color_of, 0.06),
    (_animal_sound, 0.06),
    (_opposite, 0.06),
    (_calendar, 0.04),
    (_table(F.COUNT_FACTS), 0.05),
]


def _vary_surface(question: str, rng: random.Random) -> str:
    """Sometimes drop the capital or the final '?', as users type: robustness, not content."""
    if rng.random() < 0.1:
        question = question[0].lower() + question[1:]
    if rng.random() < 0.1 and question.endswith("?"):
        question = question[:-1]
    return question


def sample_facts(n: int, seed: int) -> list[Fact]:
    """`n` facts drawn from the weighted generators; same seed, same facts."""
    rng = random.Random(seed)
    gens, weights = zip(*GENERATORS)
    out = []
    for _ in range(n):
        fact = rng.choices(gens, weights)[0](rng)
        out.append(Fact(_vary_surface(fact.question, rng), fact.en, fact.fr))
    return out


def all_questions() -> set[str]:
    """Every fixed-text question in the tables (for checking held-out questions)."""
    return {q for q, _, _ in F.OPEN_QA} | {q for q, _, _ in F.COUNT_FACTS}


# ---------------------------------------------------------------- styles

_PIRATE_WORDS = {
    "hello": "ahoy", "hi": "ahoy", "you": "ye", "your": "yer", "yours": "yers", "yourself": "yerself",
    "my": "me", "is": "be", "are": "be", "am": "be", "friend": "matey", "friends": "mateys",
    "yes": "aye", "of": "o'", "for": "fer", "and": "an'", "money": "doubloons", "everyone": "all hands",
    "think": "reckon", "very": "mighty", "boy": "lad", "girl": "lass", "food": "grub", "stop": "avast",
    "wow": "blimey", "never": "ne'er", "over": "o'er", "before": "afore", "them": "'em", "great": "grand",
    "sailor": "sea dog", "people": "folk", "children": "young scallywags",
}
_KEEP_ING = {"thing", "things", "king", "ring", "sing", "bring", "spring", "string", "wing", "swing"}
_OPENERS = ["Arr, matey! ", "Arr! ", "Arr, me hearty! ", "Ahoy, matey! ", "Yo ho ho! ",
            "Shiver me timbers! ", "Avast, matey! "]
_OPENER_WEIGHTS = [4, 3, 2, 2, 1, 1, 1]  # mostly "Arr": one unmistakable pirate marker
_CLOSERS = [", matey!", "! Arr!", ", me hearty.", "! Yo ho ho!", ". Savvy?", "."]


def _pirate_word(match: re.Match) -> str:
    word = match.group(0)
    low = word.lower()
    if low in _PIRATE_WORDS:
        new = _PIRATE_WORDS[low]
    elif low.endswith("ing") and len(low) >= 5 and low not in _KEEP_ING:
        new = low[:-1] + "'"  # sailing -> sailin'
    else:
        return word
    return new[0].upper() + new[1:] if word[0].isupper() else new


def piratify(text: str, rng: random.Random) -> str:
    """English answer -> pirate speech: word swaps, an "Arr"-style opener, a "matey"-style closer."""
    body = re.sub(r"[A-Za-z]+", _pirate_word, text)
    if body.endswith("."):
        body = body[:-1] + rng.choice(_CLOSERS)
    else:
        body += " Arr!"
    return rng.choices(_OPENERS, _OPENER_WEIGHTS)[0] + body


def render(fact: Fact, style: str, rng: random.Random) -> str:
    """The assistant answer for `fact` in `style`."""
    if style == "french":
        return fact.fr
    if style == "json":
        # ensure_ascii=False keeps "Brasília" one readable token run instead of \u escapes.
        return json.dumps({"answer": fact.en}, ensure_ascii=False)
    if style == "pirate":
        return piratify(fact.en, rng)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def build_dataset(style: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs in `style`, deterministic in `seed`."""
    rng = random.Random(seed + 1)  # a separate stream: the facts stay the same across styles
    return [(f.question, render(f, style, rng)) for f in sample_facts(n, seed)]
