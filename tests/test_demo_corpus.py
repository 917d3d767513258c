"""The review grammar: seeded, spans the whole range of sentiment, and opens neutrally."""

import re

from dpokit.experiments.demo import corpus
from dpokit.experiments.demo.corpus import generate_corpus, is_held_out_opening, review_openings

# A small hand-made lexicon, independent of the generator's own word lists, in the spirit of the
# VADER-like judge that will score continuations.
POSITIVE = {"good", "great", "wonderful", "excellent", "brilliant", "superb", "enjoyable", "loved",
            "enjoyed", "beautiful", "fantastic", "amazing", "fun", "lovely", "perfect", "best", "recommended"}
NEGATIVE = {"bad", "boring", "awful", "terrible", "dull", "horrible", "weak", "hated", "worst", "waste",
            "poor", "stupid", "tedious", "disappointing", "ridiculous", "mess", "dreadful"}
NEGATIONS = {"not", "never"}


def words(text):
    return re.findall(r"[a-z']+", text.lower())


def net_sentiment(text):
    """+1 per positive word, -1 per negative word, flipped when one of the 3 words before is a negation."""
    tokens, score = words(text), 0
    for i, w in enumerate(tokens):
        polarity = (w in POSITIVE) - (w in NEGATIVE)
        if polarity and NEGATIONS & set(tokens[max(0, i - 3) : i]):
            polarity = -polarity
        score += polarity
    return score


def test_same_seed_same_corpus_and_other_seed_differs():
    assert generate_corpus(50, seed=7) == generate_corpus(50, seed=7)
    other = generate_corpus(50, seed=8)
    assert sum(a != b for a, b in zip(generate_corpus(50, seed=7), other, strict=True)) > 45
    assert len(set(generate_corpus(2000, seed=1))) > 1990  # varied, not a handful of templates


def test_corpus_spans_sentiment_with_mixed_and_negated_reviews():
    reviews = generate_corpus(2000, seed=3)
    all_words = [w for r in reviews for w in words(r)]
    n_pos = sum(w in POSITIVE for w in all_words)
    n_neg = sum(w in NEGATIVE for w in all_words)
    assert n_pos > 800 and n_neg > 800 and 0.6 < n_pos / n_neg < 1.6
    scores = [net_sentiment(r) for r in reviews]
    assert sum(s >= 2 for s in scores) > 100 and sum(s <= -2 for s in scores) > 100  # both extremes
    mixed = sum(bool(POSITIVE & set(words(r))) and bool(NEGATIVE & set(words(r))) for r in reviews)
    assert mixed > 200
    negated = sum(bool(re.search(r"\b(not|never) (very )?(" + "|".join(POSITIVE | NEGATIVE) + r")\b", r.lower()))
                  for r in reviews)
    assert negated > 200
    assert sum("but" in words(r) for r in reviews) > 150  # contrasts: "superb, but the plot dragged"


def test_neutral_first_sentences_do_not_decide_the_sentiment_of_the_rest():
    reviews = generate_corpus(3000, seed=4)
    lexicon = POSITIVE | NEGATIVE | set(corpus.STRONG_POSITIVE + corpus.MILD_POSITIVE
                                         + corpus.MILD_NEGATIVE + corpus.STRONG_NEGATIVE)
    neutral = [r for r in reviews if not lexicon & set(words(r.split(". ")[0]))]
    assert len(neutral) > 0.7 * len(reviews)
    rest = [net_sentiment(r.split(". ", 1)[1]) for r in neutral if ". " in r]
    positive_share = sum(s > 0 for s in rest) / sum(s != 0 for s in rest)
    assert 0.4 < positive_share < 0.6


def test_review_openings_are_neutral_distinct_seeded_and_split():
    train = review_openings(300, seed=0, held_out=False)
    held = review_openings(100, seed=0, held_out=True)
    assert train == review_openings(300, seed=0, held_out=False)
    assert train != review_openings(300, seed=1, held_out=False)
    assert len(set(train)) == 300 and len(set(held)) == 100 and not set(train) & set(held)
    assert all(not is_held_out_opening(o) for o in train) and all(is_held_out_opening(o) for o in held)
    lexicon = POSITIVE | NEGATIVE | set(corpus.STRONG_POSITIVE + corpus.MILD_POSITIVE + corpus.MILD_NEGATIVE
                                         + corpus.STRONG_NEGATIVE + corpus.POSITIVE_VERBS)
    for opening in train + held:
        assert 2 <= len(opening.split()) <= 6, opening
        assert not lexicon & set(words(opening)), opening
        assert opening == opening.strip() and not opening.endswith((",", "."))
    # The hash split holds out about one text in five.
    drawn = [f"opening number {i}" for i in range(5000)]
    assert 0.17 < sum(map(is_held_out_opening, drawn)) / 5000 < 0.23


def test_openings_start_reviews_of_the_corpus():
    starts = {" ".join(r.split()[:6]) for r in generate_corpus(20000, seed=0)}
    openings = review_openings(150, seed=9, held_out=False, min_words=3, max_words=3)
    found = sum(any(s.startswith(o + " ") or s.startswith(o + ",") for s in starts) for o in openings)
    assert found >= 0.9 * len(openings)  # the rarest fillers need more than 20000 reviews
