"""Synthetic spelling and letter-counting tasks that teach the python tool (tokens hide letters from the model).

- `SpellingBee`: "How many 'r' are in 'strawberry'?" -> the assistant spells the word out, checks with a python
  call (`'strawberry'.count('r')`), reads the tool output and ends with "#### 3". Generative; scored like GSM8K.
- `SimpleSpelling`: "Spell 'apple'" -> "a-p-p-l-e", so the model ties tokens to letters.
- Examples are a pure function of (seed, index): any size, no data files. Words come from a built-in list plus
  random pronounceable pseudo-words; the train and test splits use disjoint seeds.
"""

from __future__ import annotations

import random

from nanochat.tasks.base import Task
from nanochat.tasks.gsm8k import extract_answer, numbers_equal

WORDS = """apple banana strawberry raspberry blueberry orange lemon cherry grape melon mango papaya peach pear plum
apricot coconut pineapple avocado tomato potato carrot onion garlic pepper cucumber lettuce spinach broccoli cabbage
mississippi tennessee california massachusetts connecticut philadelphia accommodate necessary embarrass occurrence
committee millennium bookkeeper balloon coffee letter success address possess assess parallel dilemma rhythm
elephant giraffe kangaroo hippopotamus crocodile alligator butterfly caterpillar dragonfly grasshopper mosquito
computer keyboard monitor printer network internet software hardware algorithm function variable parameter
language grammar sentence paragraph dictionary encyclopedia library bookshelf notebook pencil eraser scissors
mountain river ocean valley desert forest island volcano glacier canyon waterfall rainbow thunder lightning
january february september november wednesday saturday tomorrow yesterday afternoon midnight weekend holiday
chocolate vanilla cinnamon caramel marshmallow spaghetti lasagna broccoli sandwich hamburger pizza pancake
beautiful wonderful terrible horrible excellent fantastic incredible remarkable ordinary extraordinary
bicycle motorcycle airplane helicopter submarine ambulance tractor bulldozer skateboard wheelbarrow
banana bookkeeping subbookkeeper assessment successfully unnecessarily possession committee referral""".split()

_INTROS = ["How many {l} are in the word {w}?", "Count the number of '{l}' in \"{w}\".",
           "how many times does the letter {l} appear in {w}", "In the word '{w}', how many {l}s are there?",
           "What is the count of letter '{l}' in {w}?", "Tell me how many {l}'s the word {w} has."]
_SPELL = ["Spell the word {w}.", "How do you spell '{w}'?", "spell {w} letter by letter", "Can you spell \"{w}\"?"]


def _pseudo_word(rng: random.Random) -> str:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 5)))


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.7 else _pseudo_word(rng)


class _Synthetic(Task):
    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train|test, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.split = size, split
        self.seed = seed * 2 + (1 if split == "test" else 0)  # disjoint streams per split

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}:{self.seed}:{index}")


class SpellingBee(_Synthetic):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = _word(rng)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(_INTROS).format(l=letter, w=word)
        spelled = ",".join(word)
        parts = [{"type": "text", "text": f"We are looking for '{letter}' in '{word}'. Spelled out: {spelled}.\n"
                                          f"Let me count with Python to be sure.\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} time"
                                          f"{'' if count == 1 else 's'} in '{word}'.\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": str(count)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_equal(extract_answer(completion), conversation["answer"])


class SimpleSpelling(_Synthetic):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = _word(rng)
        return {"messages": [{"role": "user", "content": rng.choice(_SPELL).format(w=word)},
                             {"role": "assistant", "content": "-".join(word)}],
                "answer": "-".join(word)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return conversation["answer"] in completion
