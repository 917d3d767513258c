"""A seeded grammar of short movie reviews: the pretraining corpus of the bundled demo model.

The DPO paper's IMDb task gives a policy the first few words of a review and asks for a positive
continuation. For that to be learnable by DPO, the base model must write reviews of every
sentiment, and the opening words must not decide which: so most reviews start with a neutral
opening (what the film is about, when the reviewer watched it) whose sentiment is drawn
independently of the rest, and the body mixes praise and complaint around an overall score.

Sentiment is carried by ordinary English words (great, wonderful, boring, awful), intensifiers
(very, truly) and negations (not good, never boring), so that a lexicon judge in the style of
VADER can score the continuations. Everything is drawn from one `random.Random(seed)`: the same
seed gives the same corpus on every machine and Python version >= 3.10.
"""

from __future__ import annotations

import hashlib
import random

# ---------------------------------------------------------------------------------------------
# Neutral material: films, genres, people, places, plots. None of it carries sentiment.
# ---------------------------------------------------------------------------------------------

FILM_WORDS = ["movie", "film", "picture"]
GENRES = [
    "comedy", "drama", "thriller", "horror movie", "western", "war movie", "romantic comedy",
    "science fiction film", "crime drama", "mystery", "musical", "documentary", "animated film",
    "family film", "action movie", "period drama", "courtroom drama", "spy thriller", "road movie",
    "sports drama", "ghost story", "disaster movie", "heist movie", "coming of age story",
]
CHARACTERS = [
    "young doctor", "retired detective", "small town teacher", "struggling musician", "single mother",
    "former soldier", "shy student", "old farmer", "young lawyer", "travelling salesman", "night nurse",
    "failed boxer", "lonely widow", "ambitious reporter", "bank clerk", "ship captain", "young painter",
    "police officer", "school principal", "chef", "taxi driver", "country singer", "scientist",
    "priest", "professional thief", "factory worker", "young couple", "group of friends",
    "family of five", "retired pilot", "stage actress", "mail carrier", "young widower",
]
ACTIONS = [
    "returns to his home town", "moves to a big city", "tries to save a failing restaurant",
    "falls in love with a stranger", "investigates a murder", "plans one last robbery",
    "searches for a missing sister", "inherits an old house", "joins a travelling circus",
    "takes a job on a fishing boat", "discovers a family secret", "runs for mayor",
    "trains for a big race", "hides from the mob", "starts a band", "writes a novel",
    "crosses the country by train", "tries to win back an old friend", "opens a bakery",
    "is stranded on an island", "looks after a sick father", "gets lost in the mountains",
    "finds a box of old letters", "coaches a high school team", "hunts for buried gold",
    "spends a summer by the sea", "works the night shift at a hotel", "tries to stop a war",
]
PLACES = [
    "a small town", "Paris", "New York", "the desert", "a fishing village", "London", "Tokyo",
    "a boarding school", "the mountains", "rural Iowa", "the nineteen fifties", "a space station",
    "a big hospital", "the old West", "a quiet suburb", "Rome", "a prison", "an island",
    "Chicago", "a small apartment", "the Arctic", "a country house", "the jungle",
]
WHEN_WATCHED = [
    "last night", "last weekend", "on a Sunday afternoon", "with my brother", "with my wife",
    "with my husband", "with my parents", "on a long flight", "at a small festival", "on television",
    "after reading the book", "for a film class", "years ago", "on a rainy evening", "at the cinema",
    "with a few friends", "on cable", "late at night", "with my kids", "on a Friday night",
    "for the second time", "on a whim", "at a friend's house", "in college",
]
RELATIONS = ["friend", "sister", "brother", "mother", "father", "cousin", "roommate", "neighbour", "uncle", "teacher"]
YEARS = [str(y) for y in range(1948, 2024, 3)]
NUMBERS = ["two", "three", "four", "five", "several", "many"]

# Sentences that open a review without taking a side. Each placeholder is filled from the lists
# above; review_openings() takes the first few words of these as prompts.
NEUTRAL_OPENINGS = [
    "I watched this {film} {when}.",
    "I rented this {genre} {when}.",
    "I saw this {film} {when}.",
    "I caught this {genre} {when}.",
    "We watched this {genre} {when}.",
    "This {genre} is about a {character} who {action}.",
    "The {film} follows a {character} who {action}.",
    "Set in {place}, this {genre} follows a {character} who {action}.",
    "This {film} tells the story of a {character} who {action}.",
    "The story takes place in {place}.",
    "My {relation} told me to watch this {film}.",
    "My {relation} and I watched this {genre} {when}.",
    "I went into this {film} without knowing much about it.",
    "I have seen this {film} {number} times now.",
    "This {genre} came out in {year}.",
    "It is {year} and a {character} {action}.",
    "So I finally watched this {genre}.",
    "I picked up this {film} at the library.",
    "This is a {genre} about a {character}.",
    "The {film} opens in {place}, where a {character} {action}.",
    "I remember seeing this {film} {when}.",
    "In this {genre}, a {character} {action}.",
    "The main character is a {character} who {action}.",
    "This {genre} was made in {year}.",
    "When I saw this {film} {when}, I did not know what to expect.",
    "I had heard about this {film} from my {relation}.",
    "A {character} {action} in this {genre} from {year}.",
    "This was the first {genre} I watched this year.",
]

# A second neutral sentence after an opening: what happens, without naming the genre again.
PLOT_SENTENCES = [
    "The story takes place in {place}.", "It is about a {character} who {action}.",
    "The main character is a {character} who {action}.", "In short, a {character} {action}.",
    "It stars a {character} who {action}.", "Most of it takes place in {place}.",
]

# Openings that take a side at once; their sentiment follows the review's overall score.
POSITIVE_OPENINGS = [
    "What a {strong_pos} {film}!", "This is one of the best {genres} I have ever seen.",
    "I loved this {film} from start to finish.", "This {genre} is a real gem.",
    "I was {mild_pos_adv} surprised by this {film}.", "Simply a {strong_pos} {genre}.",
]
NEGATIVE_OPENINGS = [
    "What a {strong_neg} {film}.", "This is one of the worst {genres} I have ever seen.",
    "I hated this {film} from start to finish.", "This {genre} is a complete waste of time.",
    "I was really disappointed by this {film}.", "Simply a {strong_neg} {genre}.",
]

# ---------------------------------------------------------------------------------------------
# Sentiment material: adjectives by strength, verbs, intensifiers, per-aspect phrases, verdicts.
# ---------------------------------------------------------------------------------------------

STRONG_POSITIVE = [
    "wonderful", "brilliant", "superb", "excellent", "fantastic", "amazing", "outstanding", "beautiful",
    "magnificent", "marvelous", "stunning", "perfect", "terrific", "extraordinary", "masterful",
]
MILD_POSITIVE = [
    "good", "nice", "enjoyable", "pleasant", "solid", "charming", "engaging", "clever", "funny",
    "touching", "moving", "fun", "lovely", "impressive", "memorable", "strong", "warm", "sweet",
    "entertaining", "interesting", "decent", "fine", "likable", "gripping", "heartfelt",
]
MILD_NEGATIVE = [
    "bad", "boring", "dull", "weak", "slow", "predictable", "forgettable", "bland", "flat", "silly",
    "clumsy", "uneven", "tedious", "messy", "annoying", "disappointing", "lame", "poor", "mediocre",
    "confusing", "shallow", "tired", "stiff", "cheap", "unconvincing",
]
STRONG_NEGATIVE = [
    "awful", "terrible", "horrible", "dreadful", "atrocious", "painful", "unbearable", "pathetic",
    "ridiculous", "stupid", "pointless", "hopeless", "lifeless", "miserable", "abysmal",
]
STRONG_INTENSIFIERS = ["very", "really", "truly", "extremely", "incredibly", "absolutely", "so", "utterly"]
MILD_INTENSIFIERS = ["quite", "fairly", "pretty", "rather", "somewhat", "mostly"]
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored", "admired", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "could not stand", "was bored by", "was annoyed by", "regretted"]

# (noun phrase, plural?, positive phrases, negative phrases): what one says of each part of a film.
ASPECTS = [
    ("the acting", False, ["was convincing", "felt natural and honest"], ["was wooden", "felt forced and fake"]),
    ("the cast", False, ["did a great job", "worked well together"], ["seemed lost", "had no chemistry at all"]),
    ("the performances", True, ["were excellent across the board", "were warm and believable"],
     ["were stiff and lifeless", "were all over the place"]),
    ("the lead actress", False, ["gave a beautiful performance", "was a joy to watch"],
     ["was badly miscast", "could not deliver a single line"]),
    ("the lead actor", False, ["was perfect in the role", "gave the performance of his career"],
     ["was completely wooden", "looked bored in every scene"]),
    ("the villain", False, ["was wonderfully menacing", "was a real delight"], ["was a silly cartoon", "was never scary"]),
    ("the supporting cast", False, ["added a lot of charm", "was a real strength"], ["was wasted", "was badly written"]),
    ("the plot", False, ["kept me guessing", "was clever and surprising"], ["dragged", "made no sense"]),
    ("the story", False, ["was gripping from the start", "pulled me in"], ["went nowhere", "was a mess"]),
    ("the script", False, ["was sharp and witty", "was smart"], ["was lazy", "was full of holes"]),
    ("the dialogue", False, ["was funny and sharp", "sounded real"], ["was painful to listen to", "was clumsy"]),
    ("the pacing", False, ["was just right", "never let up"], ["was far too slow", "dragged in the middle"]),
    ("the first half", False, ["flew by", "was a lot of fun"], ["was a chore to sit through", "dragged on and on"]),
    ("the second half", False, ["was even better", "built to a great climax"], ["fell apart", "lost its way"]),
    ("the music", False, ["was beautiful", "fit every scene"], ["was annoying", "was too loud and cheap"]),
    ("the score", False, ["was haunting and lovely", "lifted every scene"], ["was forgettable", "was intrusive"]),
    ("the soundtrack", False, ["was a joy", "was full of great songs"], ["was awful", "was a poor fit"]),
    ("the cinematography", False, ["was gorgeous", "was stunning"], ["was ugly and dark", "was flat"]),
    ("the photography", False, ["was lovely", "captured every mood"], ["was murky", "was dull and grey"]),
    ("the special effects", True, ["were impressive", "still hold up"], ["were cheap", "looked fake"]),
    ("the action scenes", True, ["were thrilling", "were exciting and well made"], ["were confusing", "were boring"]),
    ("the jokes", True, ["were hilarious", "landed every time"], ["fell flat", "were stupid"]),
    ("the humor", False, ["was delightful", "made me laugh out loud"], ["was crude", "never worked"]),
    ("the characters", True, ["were likable and real", "felt like real people"],
     ["were thin and annoying", "were impossible to care about"]),
    ("the romance", False, ["was sweet and touching", "felt genuine"], ["was unconvincing", "felt forced"]),
    ("the direction", False, ["was confident", "was masterful"], ["was sloppy", "was clumsy"]),
    ("the director", False, ["knew exactly what to do", "did a wonderful job"],
     ["had no idea what to do", "made a mess of it"]),
    ("the editing", False, ["was tight", "was smooth"], ["was choppy", "was a disaster"]),
    ("the ending", False, ["was satisfying", "brought tears to my eyes"], ["was a letdown", "ruined everything"]),
    ("the final scene", False, ["was perfect", "stayed with me for days"], ["was stupid", "was a cheap trick"]),
    ("the costumes", True, ["were lovely", "were beautiful"], ["were cheap", "looked silly"]),
    ("the sets", True, ["were impressive", "were rich and detailed"], ["looked cheap", "were ugly"]),
    ("the twist", False, ["was brilliant", "caught me off guard"], ["was obvious", "was ridiculous"]),
    ("the theme song", False, ["was catchy", "was great"], ["was terrible", "was irritating"]),
]

VERDICTS = {
    2: ["A true classic.", "Highly recommended.", "One of the best films of the year.", "Do not miss it.",
        "I will watch it again and again.", "An absolute masterpiece.", "Ten out of ten.", "I loved every minute."],
    1: ["Worth watching.", "I would recommend it.", "A good way to spend an evening.", "Seven out of ten.",
        "Give it a chance.", "I enjoyed it.", "Recommended.", "A pleasant surprise."],
    0: ["It is an okay film, nothing more.", "Some good parts, some bad parts.", "Five out of ten.",
        "Watch it if you have nothing else to do.", "It was fine, I guess.", "Not great, not terrible."],
    -1: ["Not worth the money.", "I would not recommend it.", "Skip this one.", "Three out of ten.",
         "A disappointment.", "I expected much more.", "Wait for it on television."],
    -2: ["Avoid at all costs.", "A total waste of time.", "One of the worst films ever made.",
         "One out of ten.", "I want my two hours back.", "Terrible, just terrible.", "Stay away."],
}

CONNECTIVES_SAME = ["Also,", "And", "On top of that,", "Plus,", "In addition,", "What is more,"]


# ---------------------------------------------------------------------------------------------
# The grammar.
# ---------------------------------------------------------------------------------------------


def _fill(template: str, rng: random.Random) -> str:
    """Fill every {slot} of a template with a random choice; slots absent from it are not drawn."""
    slots = {
        "film": lambda: rng.choice(FILM_WORDS),
        "genre": lambda: rng.choice(GENRES),
        "genres": lambda: _plural(rng.choice(GENRES)),
        "character": lambda: rng.choice(CHARACTERS),
        "action": lambda: rng.choice(ACTIONS),
        "place": lambda: rng.choice(PLACES),
        "when": lambda: rng.choice(WHEN_WATCHED),
        "relation": lambda: rng.choice(RELATIONS),
        "year": lambda: rng.choice(YEARS),
        "number": lambda: rng.choice(NUMBERS),
        "strong_pos": lambda: rng.choice(STRONG_POSITIVE),
        "strong_neg": lambda: rng.choice(STRONG_NEGATIVE),
        "mild_pos_adv": lambda: rng.choice(["pleasantly", "happily", "really"]),
    }
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out.append(head + slots[name]())
    out.append(rest)
    return _fix_articles("".join(out))


def _fix_articles(text: str) -> str:
    """'a old farmer' -> 'an old farmer' (slots are filled after the article is written)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeio":
            words[i] += "n"
    return " ".join(words)


def _plural(noun: str) -> str:
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _adjective(strength: int, rng: random.Random) -> str:
    """An adjective phrase for a polarity `strength` in {-2, -1, 1, 2}, sometimes via a negation."""
    if strength >= 2:
        return rng.choice([f"{rng.choice(STRONG_INTENSIFIERS)} {rng.choice(MILD_POSITIVE)}",
                           rng.choice(STRONG_POSITIVE), rng.choice(STRONG_POSITIVE)])
    if strength == 1:
        return rng.choice([rng.choice(MILD_POSITIVE), rng.choice(MILD_POSITIVE),
                           f"{rng.choice(MILD_INTENSIFIERS)} {rng.choice(MILD_POSITIVE)}",
                           f"not {rng.choice(MILD_NEGATIVE)}", f"never {rng.choice(['boring', 'dull', 'slow'])}"])
    if strength == -1:
        return rng.choice([rng.choice(MILD_NEGATIVE), rng.choice(MILD_NEGATIVE),
                           f"{rng.choice(MILD_INTENSIFIERS)} {rng.choice(MILD_NEGATIVE)}",
                           f"not {rng.choice(MILD_POSITIVE)}", f"not very {rng.choice(MILD_POSITIVE)}"])
    return rng.choice([f"{rng.choice(STRONG_INTENSIFIERS)} {rng.choice(MILD_NEGATIVE)}",
                       rng.choice(STRONG_NEGATIVE), rng.choice(STRONG_NEGATIVE),
                       f"not {rng.choice(STRONG_POSITIVE)} at all"])


def _aspect_clause(strength: int, rng: random.Random, aspect=None) -> str:
    """One clause judging one part of the film, lower-case, without final punctuation."""
    noun, plural, good, bad = aspect or rng.choice(ASPECTS)
    be = rng.choice(["were", "were", "are"] if plural else ["was", "was", "is"])
    roll = rng.random()
    if roll < 0.45:
        return f"{noun} {be} {_adjective(strength, rng)}"
    if roll < 0.65:
        phrase = rng.choice(good if strength > 0 else bad)
        if abs(strength) == 2 and rng.random() < 0.5:
            phrase += rng.choice([", really", ", truly", " in every way"])
        return f"{noun} {phrase}"
    if roll < 0.8:
        verb = rng.choice(POSITIVE_VERBS if strength > 0 else NEGATIVE_VERBS)
        adverb = " really" if abs(strength) == 2 and " " not in verb and rng.random() < 0.5 else ""
        return f"I{adverb} {verb} {noun}"
    if roll < 0.9:
        return f"I thought {noun} {be} {_adjective(strength, rng)}"
    opener = rng.choice(["to be honest,", "for me,", "in my opinion,", "sadly," if strength < 0 else "happily,"])
    return f"{opener} {noun} {be} {_adjective(strength, rng)}"


def _aspect_strength(overall: float, rng: random.Random) -> int:
    """Each part of a film is judged around the overall score, with enough noise for mixed reviews."""
    score = overall + rng.gauss(0.0, 0.65)
    if score > 0.55:
        return 2
    if score > 0.0:
        return 1
    if score > -0.55:
        return -1
    return -2


def _verdict_level(overall: float) -> int:
    return 2 if overall > 0.6 else 1 if overall > 0.2 else 0 if overall > -0.2 else -1 if overall > -0.6 else -2


def generate_review(rng: random.Random) -> str:
    """One review of 2-7 sentences whose overall sentiment is uniform on [-1, 1]."""
    overall = rng.uniform(-1.0, 1.0)
    sentences = []
    roll = rng.random()
    if roll < 0.8:
        template = rng.choice(NEUTRAL_OPENINGS)
        sentences.append(_fill(template, rng))
        if rng.random() < 0.35:
            # After an opening that already names the hero, only say where it happens.
            pool = PLOT_SENTENCES if "{character}" not in template else PLOT_SENTENCES[:1] + PLOT_SENTENCES[-1:]
            sentences.append(_fill(rng.choice(pool), rng))
    elif roll < 0.9:
        pool = POSITIVE_OPENINGS if overall > 0 else NEGATIVE_OPENINGS
        sentences.append(_fill(rng.choice(pool), rng))
    aspects = rng.sample(ASPECTS, rng.randint(1, 4))
    i = 0
    while i < len(aspects):
        strength = _aspect_strength(overall, rng)
        first = _aspect_clause(strength, rng, aspects[i])
        if i + 1 < len(aspects) and rng.random() < 0.55:
            # Two parts in one sentence: contrast when they disagree ("superb, but dragged").
            other = _aspect_strength(overall, rng)
            second = _aspect_clause(other, rng, aspects[i + 1])
            if (strength > 0) != (other > 0):
                form = rng.choice(["{a}, but {b}.", "{a}, but {b}.", "{a}, but {b}.", "{a}, while {b}.",
                                   "Although {a}, {b}.", "{a}. However, {b}.", "{a}, yet {b}."])
            else:
                form = rng.choice(["{a} and {b}.", "{a}, and {b}.", "{a}. {b}."])
            text = form.format(a=first, b=second)
            i += 2
        else:
            if sentences and rng.random() < 0.2:
                first = f"{rng.choice(CONNECTIVES_SAME)} {first}"
            text = first + "."
            i += 1
        sentences.append(_capitalize_sentences(text))
    if rng.random() < 0.75:
        sentences.append(rng.choice(VERDICTS[_verdict_level(overall)]))
    return " ".join(sentences)


def _capitalize_sentences(text: str) -> str:
    parts = text.split(". ")
    return ". ".join(_capitalize(p) for p in parts)


def generate_corpus(n: int, seed: int) -> list[str]:
    """`n` reviews drawn from one seeded generator: the same (n, seed) gives the same list."""
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Prompts for the demo: the first few words of neutral openings, split into train and held-out.
# ---------------------------------------------------------------------------------------------


def is_held_out_opening(opening: str) -> bool:
    """A fixed split by content: one opening in five (by a hash of its text) is held out."""
    return hashlib.sha256(opening.encode("utf-8")).digest()[0] % 5 == 0


def review_openings(n: int, seed: int, held_out: bool, min_words: int = 2, max_words: int = 6) -> list[str]:
    """`n` distinct sentiment-neutral review openings of `min_words`-`max_words` words.

    Each is the start of a neutral opening sentence of the corpus grammar, so the base model has
    seen such beginnings and the sentiment of what follows is not decided by them. Whether an
    opening is held out depends only on its text, so train and held-out sets never share one,
    whatever the seeds.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"review_openings: need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = random.Random(seed)
    found: dict[str, None] = {}
    attempts = 0
    while len(found) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"review_openings: could not find {n} distinct openings (found {len(found)})")
        words = _fill(rng.choice(NEUTRAL_OPENINGS), rng).rstrip(".").split()
        if len(words) < min_words:
            continue
        # Cut after a word, as the corpus writes it; a comma at the cut is dropped.
        opening = " ".join(words[: rng.randint(min_words, min(max_words, len(words)))]).rstrip(",")
        if is_held_out_opening(opening) == held_out:
            found.setdefault(opening, None)
    return list(found)
