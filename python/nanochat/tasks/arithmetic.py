"""Synthetic one-step arithmetic that a tiny model can solve by calling its calculator (the python tool), asked in
many surface forms so that the model learns the request, not the wording.

- A question is composed from independent parts: a *phrasing family* (a sentence frame around an operation phrase
  such as "What is {q}?" or "Could you {v}?", a frame around the operation's noun such as "Find the {noun} of {a}
  and {b}.", or a one-step story with units: "A car drives {b} km every hour. How far does it go in {a} hours?"), an
  operation phrase from a shared lexicon ("{a} times {b}", "the product of {a} and {b}", "multiply {a} by {b}",
  "{a}*{b}"...), numbers written as digits, with thousands separators ("1,234"), in words ("forty-two", "one
  thousand two hundred and five") or with units ("12 kg", "$40"), and orthogonal noise: a greeting or a thanks, all
  lower case, no final punctuation, one typo in a word, a number that is not an operand ("Question 3: ...").
  Half the training stories are composed: a setup, an event and a question drawn independently (COMPOSED; the same
  questions follow a gain and a loss, so what decides the operation is the event, not the sentence around it),
  rates ("{b} pages a week ... after {a} weeks", RATES) and one-sentence pairs ("bought {a} and then lost {b}").
- Two held-out splits. Numbers: a problem is (operation, operands) with + and * operands sorted; its SHA-256 puts it
  in the test split (1 in 8) or the training split, and each split draws until it gets one of its own. Phrasing:
  the 24 families in HELD_OUT (about a fifth of the frames, two or three stories per operation) never appear in
  training (composed stories are training-only); the
  `phrasing="unseen"` test set uses only them, so its score says whether the model generalises to requests it
  never saw. The operation lexicon, number styles and noise are shared: what is new is the sentence around them.
- The reference answer is exactly what the engine executes at inference: a python part with the operands copied
  as the question writes them (`1_234*45` for "1,234 times 45", `81 * two hundred fifty-nine`: the calculator reads
  separators and number words, so an 11M-parameter model copies tokens instead of converting numbers, which it
  got right 0.40 of the time for words and 0.05 for "1,234"; + and * in the order the question names them), the
  calculator's own output (`nanochat.tools.calculator.evaluate`, so the two can never disagree), then "The answer
  is 55530." Nothing precedes the call, so the first sampled token decides it.
- Examples are a pure function of (seed, split, phrasing, index).
- Scoring: the last number of the reply's text outside the tool blocks (commas, a trailing period or words, a
  leading minus all handled) must equal the calculator's result. `tools=False` marks the evaluation without the
  tool: the engine then runs no calculator and the model must produce the number itself.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from decimal import Decimal

from nanochat.tasks.base import Task
from nanochat.tools.calculator import NUMBER_WORDS, ONES, TENS, words_value
from nanochat.tools.calculator import evaluate as calculate

OPS = "+-*/"
TEST_FRACTION = 8  # one problem in 8 is held out
ANSWER_TEXT = "\n\nThe answer is {}."

# ---------------------------------------------------------------------------------------------------------------
# The lexicon, shared by every family: {a} op {b} as a noun phrase, as an imperative, and the operation's noun.
# Phrases with a symbol take digits only ("twelve*7" is no one's way of writing).

NOUN_PHRASES = {
    "+": ["{a} plus {b}", "{a} + {b}", "{a}+{b}", "the sum of {a} and {b}", "{a} added to {b}",
          "{a} and {b} added together", "the total of {a} and {b}", "{a} more than {b}"],
    "-": ["{a} minus {b}", "{a} - {b}", "{a}-{b}", "{b} less than {a}", "{a} take away {b}", "{b} subtracted from {a}",
          "{a} less {b}", "the difference {a} minus {b}"],
    "*": ["{a} times {b}", "{a} * {b}", "{a}*{b}", "{a} x {b}", "{a} multiplied by {b}", "the product of {a} and {b}",
          "{a} lots of {b}", "{a} groups of {b}"],
    "/": ["{a} divided by {b}", "{a} / {b}", "{a}/{b}", "{a} over {b}", "the quotient of {a} and {b}",
          "{a} split into {b} equal parts", "{a} shared equally by {b}", "{a} divided into {b} equal parts"],
}
VERB_PHRASES = {
    "+": ["add {a} and {b}", "add {b} to {a}", "add up {a} and {b}", "sum {a} and {b}", "put {a} and {b} together",
          "combine {a} and {b}"],
    "-": ["subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}", "deduct {b} from {a}",
          "remove {b} from {a}", "reduce {a} by {b}"],
    "*": ["multiply {a} by {b}", "multiply {a} and {b}", "multiply {a} with {b}", "times {a} by {b}"],
    "/": ["divide {a} by {b}", "split {a} into {b} equal parts", "share {a} equally among {b}",
          "divide {a} into {b} equal parts"],
}
NOUNS = {"+": ["sum", "total"], "-": ["difference"], "*": ["product"], "/": ["quotient"]}

# ---------------------------------------------------------------------------------------------------------------
# Phrasing families: name -> template. {q} is a noun phrase, {v}/{V} an imperative (capitalised), {noun} the
# operation's noun; stories name their numbers themselves. HELD_OUT lists the families no training row uses.

NOUN_FRAMES = {
    "what-is": "What is {q}?", "whats": "What's {q}?", "how-much": "How much is {q}?", "is-what": "{q} is what?",
    "equals-q": "{q} = ?", "bare": "{q}", "calculate": "Calculate {q}.", "compute": "Compute {q}.",
    "tell-me": "Tell me {q}.", "can-you-tell": "Can you tell me what {q} is?", "does-equal": "What does {q} equal?",
    "find": "Find {q}.", "value-of": "Give me the value of {q}.", "need-to-know": "I need to know {q}.",
    "answer-to": "What's the answer to {q}?", "solve": "Solve {q}.",
    "quick-one": "Quick one: {q}?", "how-much-would": "How much would {q} be?", "please-q": "{q}, please.",
    "any-idea": "Any idea what {q} is?", "know-q": "Do you know {q}?", "question-is": "My question is: {q}?",
    "q-equals": "{q} equals what?", "evaluate": "Evaluate {q}.", "whats-q-again": "Remind me, what's {q}?",
    "get-for": "What do I get for {q}?", "homework": "My homework asks for {q}. What is it?",
    "check": "Can you check {q} for me?", "number-for": "What number is {q}?",
    "need-q": "Need {q}, quick.", "help-q": "Help! What is {q}?",
    # held out
    "work-out": "Work out {q} for me.", "comes-to": "Do you know what {q} comes to?",
    "figure-out": "I'm trying to figure out {q}. Any idea?", "result-of": "What is the result of {q}?",
    "wondering": "I was wondering how much {q} is.",
    "keep-getting": "Could you help with {q}? I keep getting it wrong.",
}
VERB_FRAMES = {
    "imperative": "{V}.", "please": "Please {v}.", "could-you": "Could you {v}?", "can-you": "Can you {v} for me?",
    "need-you": "I need you to {v}.", "what-if": "What do you get if you {v}?",
    "and-tell": "{V} and tell me the result.",
    "help-me": "Help me {v}.",
    "want-to": "I want to {v}. What is the result?", "how-do": "What's the answer if I {v}?",
    "kindly": "Kindly {v}.", "go-ahead": "Go ahead and {v}.", "try": "Try to {v}.",
    "can-we": "Can we {v}?", "quickly": "Quickly {v} for me.", "now": "Now {v}.",
    "show-me": "Show me what you get when you {v}.", "asked-to": "I was asked to {v}. What should I get?",
    # held out
    "would-you": "Would you {v}, please?", "what-happens": "What happens when you {v}?",
    "lets": "Let's {v}. What do we get?",
    "is-it-possible": "Is it possible to {v}? I'd like the number.",
}
NOUN_OF_FRAMES = {
    "their-noun": "{a} and {b}: what is their {noun}?", "find-the-noun": "Find the {noun} of {a} and {b}.",
    "what-is-the-noun": "What is the {noun} of {a} and {b}?",
    "give-noun": "Give me the {noun} of {a} and {b}.", "noun-q": "{Noun} of {a} and {b}?",
    "for-numbers": "Take {a} and {b}. What's the {noun}?", "could-find-noun": "Could you find the {noun} of {a} and {b}?",
    "noun-please": "The {noun} of {a} and {b}, please.", "numbers-noun": "Numbers: {a}, {b}. {Noun}?",
    # held out
    "two-numbers": "I have two numbers, {a} and {b}. What is their {noun}?",
    "between": "Between {a} and {b}, what's the {noun}?",
}
# One-step stories; {a} op {b} again; {a$} is an amount of money ("$40" or "40 dollars"). Counts of things stay
# whole; amounts of money, kilograms, litres, kilometres and metres may have a decimal.
STORIES = {
    "+": {"gets-more": "{name} has {a} {things}. {Pro} gets {b} more. How many {things} does {pro} have now?",
          "shop-sold": "A shop sold {a} {things} in the morning and {b} in the afternoon. How many {things} did it "
                       "sell in all?",
          "two-boxes": "There are {a} {things} in one box and {b} in another. How many {things} are there altogether?",
          "spent-two-days": "{name} spent {a$} on Monday and {b$} on Tuesday. How much did {pro} spend in total?",
          "walked": "{name} walked {a} km in the morning and {b} km in the evening. How far did {pro} walk?",
          "tank": "A tank holds {a} liters of water. {b} more liters are poured in. How many liters are in it now?",
          "bus-on": "A bus has {a} passengers. At the next stop {b} more get on. How many passengers are on it now?",
          "read-two-days": "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {pro} "
                           "read?",
          "heavier": "A dog weighs {a} kg. A bigger dog weighs {b} kg more. How heavy is the bigger dog?",
          # held out
          "collected": "{name}'s class collected {a} {things} last week and {b} this week. What is the total?",
          "put-together": "If you put {a} {things} and {b} {things} together, how many do you have?",
          "followers": "{name} had {a} followers, and {b} new people followed {obj} this month. How many followers "
                       "does {pro} have now?"},
    "-": {"gave-away": "{name} had {a} {things} and gave {b} to a friend. How many {things} does {pro} have left?",
          "library": "A library had {a} {things}. It lent out {b} of them. How many are still there?",
          "needs-more": "{name} needs {a} {things} and already has {b}. How many more does {pro} need?",
          "money-left": "{name} had {a$} and spent {b$}. How much money is left?",
          "rope": "A rope is {a} meters long. {name} cuts off {b} meters. How much rope is left?",
          "flour": "A bag of flour weighs {a} kg. {b} kg were used for baking. How many kg remain?",
          "lost-some": "{name} had {a} {things} and lost {b} of them. How many {things} are left?",
          "bus-off": "A bus has {a} passengers. At the next stop {b} get off. How many are still on the bus?",
          "jar-eaten": "There were {a} {things} in a jar. {name} took {b} of them. How many are in the jar now?",
          "more-than": "{name} has {a} {things}, and a friend has {b}. How many more {things} does {name} have?",
          # held out
          "trip": "The trip is {a} km long and we have driven {b} km so far. How many km are left to go?",
          "points": "{name} scored {a} points and then lost {b} points. How many points does {pro} have now?",
          "unsold": "A baker made {a} rolls and sold {b} of them by noon. How many rolls are unsold?"},
    "*": {"boxes-each": "There are {a} boxes with {b} {things} in each. How many {things} are there in total?",
          "packs": "{name} buys {a} packs of {things}. Each pack has {b}. How many {things} is that?",
          "garden": "A garden has {a} rows of {b} plants. How many plants are in the garden?",
          "tickets": "One ticket costs {b$}. How much do {a} tickets cost?",
          "car-hours": "A car drives {b} km every hour. How far does it go in {a} hours?",
          "bags-weigh": "Each bag weighs {b} kg. What do {a} bags weigh together?",
          "reads-daily": "{name} reads {b} pages every day. How many pages does {pro} read in {a} days?",
          "machine": "A machine makes {b} {things} each hour. How many {things} does it make in {a} hours?",
          "notebooks": "Notebooks cost {b$} each. What is the price of {a} notebooks?",
          "pump": "A pump moves {b} liters per minute. How many liters does it move in {a} minutes?",
          # held out
          "saves-weekly": "{name} saves {b$} a week. How much has {pro} saved after {a} weeks?",
          "hall-seats": "A hall has {a} rows with {b} seats in each row. How many seats are there?",
          "tea": "A box of tea has {b} bags. How many tea bags are in {a} boxes?"},
    "/": {"children": "{a} {things} are shared equally among {b} children. How many does each child get?",
          "piles": "{name} puts {a} {things} into {b} equal piles. How many {things} are in each pile?",
          "bill": "{b} friends split a bill of {a$} equally. How much does each friend pay?",
          "ribbon": "A ribbon {a} meters long is cut into {b} equal pieces. How long is each piece in meters?",
          "jugs": "{a} liters of juice are poured equally into {b} jugs. How many liters go into each jug?",
          "stages": "A race of {a} km is run in {b} equal stages. How long is each stage in km?",
          "speed": "A car travels {a} km in {b} hours. How many km does it travel each hour?",
          "book-price": "{name} paid {a$} for {b} books that cost the same. How much was one book?",
          "pump-rate": "A pump fills {a} liters in {b} minutes. How many liters is that per minute?",
          "pages-day": "{name} read {a} pages in {b} days, the same number each day. How many pages a day?",
          # held out
          "per-hour": "{name} earns {a$} for {b} hours of work. How much is that per hour?",
          "groups": "A class of {a} students is split into {b} equal groups. How many students are in each group?",
          "bags-filled": "{a} {things} are packed {b} to a bag. How many bags are filled?"},
}
# Composed stories (training only): a setup that brings in {a}, an event that brings in {b} and decides the
# operation, and a question, drawn independently within a theme; the themes of + and - share their setups and
# questions ("How many are there now?" follows a gain and a loss alike), so the model must read the event, not
# the frame. The family is the event.
_HAVE = ["{name} has {a} {things}.", "{name} had {a} {things} in a box.", "{name} owns {a} {things}.",
         "There were {a} {things} on {name}'s desk.", "{name} started the day with {a} {things}.",
         "In {name}'s bag there are {a} {things}.", "{name} keeps {a} {things} in a drawer.",
         "{name} won {a} {things}.", "{name} bought {a} {things}.", "{name} picked {a} {things}.",
         "{name} made {a} {things}."]
_NOW = ["How many {things} does {pro} have now?", "How many {things} are there now?", "Now how many {things} are there?",
        "How many {things} does {name} have at the end?"]
_HAVE_MONEY = ["{name} has {a$} in a wallet.", "{name} earned {a$} on Saturday.", "{name}'s account holds {a$}.",
               "{name} had {a$} saved."]
_NOW_MONEY = ["How much money does {pro} have now?", "How much does {pro} have now?", "How much money is there now?"]
COMPOSED = {
    "+": [{"setups": _HAVE, "questions": _NOW + ["How many {things} does {pro} have in all?",
                                                 "How many {things} altogether?"],
           "events": {"buys-more": "{Pro} buys {b} more.", "finds-more": "Then {pro} finds {b} more {things}.",
                      "friend-gives": "A friend gives {obj} {b} more.", "wins": "{Pro} wins another {b} at a fair.",
                      "picks-up": "Later {pro} picks up {b} more.", "present": "{Pro} gets {b} {things} as a present.",
                      "makes": "{Pro} makes {b} more.", "arrive": "{b} more {things} arrive in the mail.",
                      "new-ones": "{Pro} gets {b} new ones.", "new-arrive": "{b} new {things} are added."}},
          {"setups": _HAVE_MONEY, "questions": _NOW_MONEY + ["How much is that in all?"],
           "events": {"earns-more": "{Pro} earns {b$} more on Sunday.", "is-paid": "Then {pro} is paid {b$}.",
                      "gift-money": "{Pro} receives a gift of {b$}.", "deposits": "{Pro} puts in another {b$}."}}],
    "-": [{"setups": _HAVE, "questions": _NOW + ["How many {things} does {pro} have left?",
                                                 "How many {things} remain?"],
           "events": {"gives-friend": "{Pro} gives {b} to a friend.", "sells": "{Pro} sells {b} of them.",
                      "loses": "{Pro} loses {b}.", "break": "{b} of them break.", "uses": "{Pro} uses {b}.",
                      "throws": "{Pro} throws away {b}.", "lends": "{Pro} lends {b} to a classmate.",
                      "donates": "{Pro} donates {b} {things} to a school."}},
          {"setups": _HAVE_MONEY, "questions": _NOW_MONEY + ["How much is left?"],
           "events": {"spends": "{Pro} spends {b$} on lunch.", "pays": "{Pro} pays {b$} for a book.",
                      "charity": "{Pro} gives {b$} to charity.", "withdraws": "{Pro} takes out {b$}."}}],
    "*": [{"setups": ["{name} has {a} boxes.", "There are {a} bags on a table.", "A shelf holds {a} jars.",
                      "{name} buys {a} packs.", "A store gets {a} crates."],
           "questions": ["How many {things} are there in total?", "How many {things} is that altogether?",
                         "How many {things} are there in all?", "How many {things} are there now?"],
           "events": {"each-holds": "Each one holds {b} {things}.", "in-each": "There are {b} {things} in each.",
                      "every-one": "Every one of them contains {b} {things}.",
                      "inside": "Each has {b} {things} inside."}}],
    "/": [{"setups": _HAVE[:4] + ["A teacher has {a} {things}.", "{name} baked {a} {things}."],
           "questions": [""],  # the event asks: what each one gets depends on how they were shared
           "events": {"shares-friends": "{Pro} shares them equally among {b} friends. How many does each friend get?",
                      "split-children": "They are split evenly between {b} children. How many does each child get?",
                      "same-boxes": "{Pro} packs them into {b} boxes, the same number in each. How many go in a box?",
                      "hands-out": "{Pro} hands them out to {b} people so that all get the same. How many does "
                                   "each person get?"}},
          # how many groups of {b} there are in {a} (the other division)
          {"setups": _HAVE[:4] + ["A farm has {a} {things}.", "A factory made {a} {things}."],
           "questions": [""],
           "events": {"puts-each-box": "{Pro} puts {b} in each box. How many boxes does {pro} fill?",
                      "rows-of": "They are laid out in rows of {b}. How many rows are there?",
                      "bag-holds": "One bag holds {b} of them. How many bags are needed?",
                      "per-team": "Every team gets {b} of them. How many teams can get some?",
                      "stacks-of": "They are stacked in piles of {b}. How many piles are made?"}}],
}
RATES = {  # what, its unit, the periods it is counted in
    "reads": ("{name} reads {b} pages {per}.", "{name} read {a} pages in {b} {periods}.", "pages"),
    "walks": ("{name} walks {b} km {per}.", "{name} walked {a} km in {b} {periods}.", "km"),
    "paid-rate": ("{name} is paid {b$} {per}.", None, "money"),
    "spends-rate": ("{name} spends {b$} {per}.", "{name} spent {a$} over {b} {periods}.", "money"),
    "bakes": ("A baker bakes {b} cakes {per}.", "A baker baked {a} cakes in {b} {periods}.", "cakes"),
    "drinks": ("{name} drinks {b} liters of water {per}.", "{name} drank {a} liters of water in {b} {periods}.",
               "liters"),
    "machine-makes": ("A machine makes {b} {things} {per}.", "A machine made {a} {things} in {b} {periods}.",
                      "{things}"),
}
PERIODS = ["day", "week", "month", "hour", "minute", "year"]
PER = ["a {p}", "per {p}", "each {p}", "every {p}"]
RATE_QUESTIONS = {
    "*": ["How many {unit} is that in {a} {p}s?", "How many {unit} after {a} {p}s?", "What is the total for {a} {p}s?",
          "How many {unit} in {a} {p}s?", "How many {unit} over {a} {p}s?"],
    "/": ["How many {unit} is that {per}?", "How many {unit} {per} is that?", "What is that {per}, on average?",
          "How many {unit} did it come to {per}?"],
}


def compose_rate(rng: random.Random, op: str, what: str) -> str:
    """A composed rate story: "{name} reads {b} pages a week. How many pages after {a} weeks?" (*), or "{name}
    read {a} pages in {b} weeks. How many pages is that per week?" (/)."""
    times, total, unit = RATES[what]
    p = rng.choice(PERIODS)
    per = rng.choice(PER).format(p=p).replace("a hour", "an hour")
    question = rng.choice(RATE_QUESTIONS[op]).replace("{per}", per).replace("{p}", p)
    question = question.replace("{unit}", unit).replace("How many money", "How much money")
    story = times if op == "*" else total
    return story.replace("{per}", per).replace("{periods}", p + "s") + " " + question


# One-sentence stories of two amounts (training only): "{name} picked {a} apples on Monday and {b} on Tuesday."
# (+), "{name} bought {a} apples and then lost {b}." (-), "... and then found {b} more." (+)
PAIR_TIMES = [("on Monday", "on Tuesday"), ("in the morning", "in the afternoon"), ("yesterday", "today"),
              ("before lunch", "after lunch"), ("last year", "this year"), ("in May", "in June")]
PAIR_VERBS = ["picked", "sold", "read", "baked", "found", "made", "caught", "painted", "washed", "counted"]
GAINS = ["bought", "won", "picked", "made", "baked", "found", "got"]
LOSSES = ["lost", "sold", "ate", "gave away", "broke", "used", "dropped"]
PAIR_TOTALS = ["How many {things} is that in all?", "How many {things} in total?",
               "What is the total number of {things}?", "How many {things} altogether?",
               "How many {things} is that for both?"]


# family -> (operation, kind, verb)
PAIRS = {f"two-times-{v}": ("+", "two-times", v) for v in PAIR_VERBS} | {
    f"gain-gain-{v}": ("+", "gain-gain", v) for v in GAINS} | {
    f"gain-loss-{v.replace(' ', '-')}": ("-", "gain-loss", v) for v in LOSSES}


def compose_pair(rng: random.Random, family: str) -> str:
    """A one-sentence story of two amounts around `family`'s verb (PAIRS)."""
    _, kind, verb = PAIRS[family]
    if kind == "two-times":
        t1, t2 = rng.choice(PAIR_TIMES)
        return f"{{name}} {verb} {{a}} {{things}} {t1} and {{b}} {t2}. " + rng.choice(PAIR_TOTALS)
    first = rng.choice([g for g in GAINS if g != verb])
    then = rng.choice(["and then", "and later", ", then", "but then"] if kind == "gain-loss" else ["and then", "and later"])
    more = " more" if kind == "gain-gain" else ""
    return (f"{{name}} {first} {{a}} {{things}} {then} {verb} {{b}}{more}. ".replace(" , ", ", ")
            + rng.choice(_NOW + (["How many are left?"] if kind == "gain-loss" else PAIR_TOTALS[:2])))


PAST = {"buys-more": "{Pro} bought {b} more.", "finds-more": "Then {pro} found {b} more {things}.",
        "friend-gives": "A friend gave {obj} {b} more.", "wins": "{Pro} won another {b} at a fair.",
        "picks-up": "Later {pro} picked up {b} more.", "present": "{Pro} got {b} {things} as a present.",
        "makes": "{Pro} made {b} more.", "new-ones": "{Pro} got {b} new ones.",
        "new-arrive": "{b} new {things} were added.", "earns-more": "{Pro} earned {b$} more on Sunday.",
        "is-paid": "Then {pro} was paid {b$}.", "gift-money": "{Pro} received a gift of {b$}.",
        "deposits": "{Pro} put in another {b$}.",
        "gives-friend": "{Pro} gave {b} to a friend.", "sells": "{Pro} sold {b} of them.", "loses": "{Pro} lost {b}.",
        "break": "{b} of them broke.", "uses": "{Pro} used {b}.", "throws": "{Pro} threw away {b}.",
        "lends": "{Pro} lent {b} to a classmate.", "donates": "{Pro} donated {b} {things} to a school.",
        "spends": "{Pro} spent {b$} on lunch.", "pays": "{Pro} paid {b$} for a book.",
        "charity": "{Pro} gave {b$} to charity.", "withdraws": "{Pro} took out {b$}."}
# sentences with a number that is not an operand, and prefixes with one (noise for every split)
ASIDES = ["{Pro} is {n} years old.", "It is {w} o'clock.", "{Pro} has {w} brothers.", "Today is day {n} of the trip.",
          "{Pro} lives at number {n}.", "That was {w} days ago."]
NUMBERED = ["Question {n}: ", "Problem {n}. ", "Exercise {w}: ", "Part {w}) ", "Task {n} on my list: ",
            "Two questions today, here is the first. ", "Day {n} of practice: ", "Question {w}: ",
            "One more: ", "I have one question. ", "Three things to check, first: ", "For my {w} kids: "]
HELD_OUT = frozenset({"work-out", "comes-to", "figure-out", "result-of", "wondering",  # 5 of 21 noun frames
                      "would-you", "what-happens", "lets",  # 3 of 11 verb frames
                      "two-numbers",  # 1 of 4 noun-of frames
                      "collected", "put-together", "trip", "points",  # 2 of 8 or 9 stories per operation
                      "saves-weekly", "hall-seats", "per-hour", "groups",
                      # added with the composed stories, before any model was tuned on the set above
                      "keep-getting", "is-it-possible", "between", "followers", "unsold", "tea", "bags-filled"})
# how often each kind of family is drawn, and how often a training story is composed rather than written out
KINDS = {"noun": 0.35, "verb": 0.2, "noun-of": 0.1, "story": 0.35}
COMPOSED_SHARE = 0.5

NAMES = [("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ana", "she"), ("Tom", "he"), ("Zoe", "she"),
         ("Ravi", "he"), ("Lena", "she"), ("Omar", "he"), ("Iris", "she")]
THINGS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "cards", "shells", "stamps"]
UNITS = ["{} kg", "{} km", "{} dollars", "${}", "{} meters", "{} liters", "{} apples", "{} points"]
GREETINGS = ["Hi! ", "Hello, ", "Hey, ", "Quick question: ", "Excuse me, ", "Sorry to bother you, but ", "Math help: ",
             "Okay, ", "Hi there. ", "Good morning! "]
THANKS = [" Thanks!", " Thank you.", " Thanks in advance.", " Please.", " Cheers!", " I need this for homework.",
          " Thx", " Appreciate it."]


def families(split: str, phrasing: str = "seen") -> dict[str, dict[str, str]]:
    """kind -> {family name: template} of the families a split draws from (stories keyed "story+", "story-"...).
    Training and the "seen" test set use the families outside HELD_OUT, the "unseen" test set only those in it."""
    if phrasing not in ("seen", "unseen"):
        raise ValueError(f"phrasing must be seen|unseen, got {phrasing!r}")
    if split == "train" and phrasing == "unseen":
        raise ValueError("the held-out phrasing families are never trained on: phrasing='unseen' needs split='test'")
    keep = (lambda name: name in HELD_OUT) if phrasing == "unseen" else (lambda name: name not in HELD_OUT)
    kinds = {"noun": NOUN_FRAMES, "verb": VERB_FRAMES, "noun-of": NOUN_OF_FRAMES,
             **{f"story{op}": STORIES[op] for op in OPS}}
    found = {kind: {n: t for n, t in frames.items() if keep(n)} for kind, frames in kinds.items()}
    for op in OPS:  # composed stories: family -> how to compose it (no held-out one: all train)
        events = {event: "story" for theme in COMPOSED[op] for event in theme["events"]}
        if op in "*/":
            events |= {what: "rate" for what, forms in RATES.items() if forms[0 if op == "*" else 1]}
        events |= {family: "pair" for family, (pair_op, _, _) in PAIRS.items() if pair_op == op}
        found[f"composed{op}"] = {} if phrasing == "unseen" else events
    return found


def compose_story(rng: random.Random, op: str, event: str) -> str:
    """A composed story around `event` of operation `op`: one of its theme's setups, the event (in the present or
    the past, its own sentence or joined to the setup: "..., and then she lost 5"), one question; sometimes a
    sentence with a number that is not an operand ("He is 9 years old.") after the setup."""
    theme = next(t for t in COMPOSED[op] if event in t["events"])
    setup, happens = rng.choice(theme["setups"]), theme["events"][event]
    if event in PAST and rng.random() < 0.5:
        happens = PAST[event]
    if rng.random() < 0.3 and happens.startswith(("{Pro} ", "Then {pro} ")):
        happens = happens.replace("Then {pro} ", "{pro} ").replace("{Pro} ", "{pro} ", 1)
        setup = setup[:-1] + rng.choice([", and then", " and then", ", then", " and later"])
    elif rng.random() < 0.2:
        asides = ASIDES if "{name}" in setup else [a for a in ASIDES if "{Pro}" not in a]
        aside = rng.choice(asides).replace("{n}", str(rng.randint(2, 30))).replace("{w}", rng.choice(ONES[2:13]))
        setup += " " + aside
    return " ".join(p for p in (setup, happens, rng.choice(theme["questions"])) if p)


# ---------------------------------------------------------------------------------------------------------------
# Numbers in words and with separators

MAX_WORDS = 999_999


def spell(n: int, british: bool = False, hyphen: bool = True) -> str:
    """0 <= n <= 999,999 in English words: 1205 -> "one thousand two hundred five" ("... two hundred and five"
    with `british`); 42 -> "forty-two" ("forty two" without `hyphen`)."""
    if not 0 <= n <= MAX_WORDS:
        raise ValueError(f"spell takes 0..{MAX_WORDS}, got {n}")

    def below_1000(m: int, joined: bool) -> list[str]:  # `joined`: something precedes, so "and" may be due
        words = []
        if m >= 100:
            words += [ONES[m // 100], "hundred"]
            m %= 100
        if m and british and (words or joined):
            words.append("and")
        if m >= 20:
            words.append(TENS[m // 10] + (("-" if hyphen else " ") + ONES[m % 10] if m % 10 else ""))
        elif m:
            words.append(ONES[m])
        return words

    if n == 0:
        return "zero"
    words = below_1000(n // 1000, False) + ["thousand"] if n >= 1000 else []
    return " ".join(words + below_1000(n % 1000, bool(words)))


def parse_number(text: str) -> Decimal:
    """A number as a question may write it: "1,234", "$40", "-12", "7.5", "forty-two", "One thousand and five".
    The inverse of the generator's number styles (the tests check every question's operands with it)."""
    s = text.strip().lower()
    if re.fullmatch(r"\$?-?\d{1,3}(,\d{3})+(\.\d+)?|\$?-?\d+(\.\d+)?", s):
        return Decimal(s.lstrip("$").replace(",", ""))
    try:
        return Decimal(words_value(s.replace("-", " ").split()))
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def write_number(rng: random.Random, x: str, symbolic: bool) -> str:
    """One operand as the question writes it: digits; thousands separators from 1,000 on (30%); words for whole
    numbers (20% below 100, 6% above), never next to a symbol (`symbolic`)."""
    value = Decimal(x)
    whole = value == value.to_integral_value() and 0 <= value <= MAX_WORDS
    if whole and not symbolic and rng.random() < (0.2 if value < 100 else 0.06):
        return spell(int(value), british=rng.random() < 0.3, hyphen=rng.random() < 0.8)
    if abs(value) >= 1000 and rng.random() < 0.3:
        whole_part, _, frac = x.partition(".")
        return f"{int(whole_part):,}" + (f".{frac}" if frac else "")
    return x


# ---------------------------------------------------------------------------------------------------------------
# Noise that leaves the request intact

def add_typo(rng: random.Random, text: str) -> str:
    """One typo (two letters swapped, one dropped or one doubled) in a word of 4+ letters that is not a number."""
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", text) if m.group().lower() not in NUMBER_WORDS]
    if not words:
        return text
    m = rng.choice(words)
    w, i = m.group(), rng.randrange(1, len(m.group()) - 1)
    kind = rng.randrange(3)
    typo = (w[:i] + w[i + 1] + w[i] + w[i + 2:] if kind == 0 else w[:i] + w[i + 1:] if kind == 1
            else w[:i] + w[i] + w[i:])
    return text[:m.start()] + typo + text[m.end():]


def add_noise(rng: random.Random, question: str) -> str:
    if rng.random() < 0.12:  # a number that is not an operand: "Question 3: what is ..."
        name = question.split("'")[0].split()[0] in {n for n, _ in NAMES}
        prefix = rng.choice(NUMBERED).format(n=rng.randint(1, 20), w=rng.choice(ONES[1:11]))
        question = prefix + (question if name or prefix.endswith(". ") else question[0].lower() + question[1:])
    if rng.random() < 0.25:  # "Hi! what is ...", but "Hi! Mia has ..."
        name = question.split("'")[0].split()[0] in {n for n, _ in NAMES}
        question = rng.choice(GREETINGS) + (question if name else question[0].lower() + question[1:])
    if rng.random() < 0.2:
        question += rng.choice(THANKS)
    if rng.random() < 0.12:
        question = question.rstrip(".?!")
    if rng.random() < 0.15:
        question = add_typo(rng, question)
    if rng.random() < 0.15:
        question = question.lower()
    return question[0].upper() + question[1:] if rng.random() < 0.9 else question


def with_unit(unit: str, number: str) -> str:
    """"${}" only before plain whole digits ("$1,200", not "$forty" or "$7.5": those read "... dollars")."""
    if unit.startswith("$") and not re.fullmatch(r"[\d,]+", number):
        unit = "{} dollars"
    return unit.format(number)


# ---------------------------------------------------------------------------------------------------------------
# Problems


def _number(rng: random.Random, digits: int, decimal: bool = False) -> Decimal:
    value = Decimal(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))
    return value + Decimal(rng.randint(1, 9)) / 10 if decimal else value


def _digits(rng: random.Random) -> int:
    return rng.choices([1, 2, 3, 4], weights=[2, 4, 3, 1])[0]


def _text(x: Decimal) -> str:
    return format(x.normalize(), "f") if x != x.to_integral_value() else str(int(x))


def problem_key(op: str, a: str, b: str) -> str:
    """The problem without its phrasing: + and * operands sorted (7+5 is 5+7), numbers canonical (7.50 is 7.5)."""
    a, b = _text(Decimal(a)), _text(Decimal(b))
    if op in "+*":
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


def is_test_problem(op: str, a: str, b: str) -> bool:
    digest = hashlib.sha256(problem_key(op, a, b).encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_FRACTION == 0


def split_call(call: str) -> tuple[str, str, str] | None:
    """(a, op, b) of a call written by `expression` (`12*7`, `5-(-12)`, `81 * two hundred`); None for another."""
    m = re.fullmatch(r"(.+) ([-+*/]) \(?(.+?)\)?", call.strip()) or \
        re.fullmatch(r"(-?[\d_.]+)([-+*/])\(?(-?[\d_.]+)\)?", call.strip())
    return m.groups() if m else None


def expression(op: str, a: str, b: str) -> str:
    """The calculator call: `123*45`, a negative right operand in parentheses (`5-(-12)`); operands as the question
    writes them (the calculator reads both styles): thousands separators become Python's `_` ("1,234" ->
    `1_234`, the same digit tokens), number words stay words, lower case, with spaces around the operator
    (`81 * two hundred fifty-nine`): the model copies what it reads and the tool converts."""
    a, b = (x.replace(",", "_") if re.match(r"-?\d", x) else x.lower() for x in (a, b))
    spaced = not (re.match(r"-?\d", a) and re.match(r"-?\d", b))
    b = f"({b})" if b.startswith("-") else b
    return f"{a} {op} {b}" if spaced else f"{a}{op}{b}"


def draw_problem(rng: random.Random, op: str, decimals: bool, negatives: bool) -> tuple[str, str]:
    """Operands (a, b) of `a op b` as canonical digits. Without `negatives`, a subtraction never goes below 0;
    quotients are exact and short (a = b x quotient); products stay within 8 digits."""
    decimal = decimals and rng.random() < 0.15
    if op == "/":
        b = Decimal(rng.randint(2, 99) if rng.random() < 0.7 else rng.randint(2, 9))
        a = b * _number(rng, rng.choice([1, 2, 2, 3]), decimal)
    else:
        a, b = _number(rng, _digits(rng), decimal), _number(rng, _digits(rng), decimal and rng.random() < 0.5)
        if op == "*" and a * b >= 10 ** 8:
            b = _number(rng, 2, False)
        if op == "-" and not negatives and b > a:
            a, b = b, a
        if negatives and rng.random() < 0.08:
            a, b = (-a, b) if rng.random() < 0.5 else (a, -b)
    return _text(a), _text(b)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


_TOOL_BLOCK = re.compile(r"<\|python_start\|>.*?(?:<\|python_end\|>|$)|<\|output_start\|>.*?(?:<\|output_end\|>|$)",
                         re.DOTALL)
# a number: optional minus (not the minus of "12-7", which reads 12 and 7), digits with optional thousands commas,
# optional decimals; "5,535" is one number, "1,2" is two
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def final_number(completion: str) -> str | None:
    """The last number in the reply's own text (tool calls and outputs removed), without commas; None if none."""
    found = _NUMBER.findall(_TOOL_BLOCK.sub(" ", completion))
    return found[-1].replace(",", "") if found else None


def numbers_match(got: str | None, want: str) -> bool:
    if got is None:
        return False
    try:
        return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The task


class Arithmetic(Task):
    """`size` problems of the train or test split. `phrasing="unseen"` (test only) asks them in the held-out
    phrasing families; `tools=False` is the same set evaluated without the tool."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, tools: bool = True,
                 phrasing: str = "seen", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train|test, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.families = families(split, phrasing)
        self.size, self.split, self.seed, self.tools, self.phrasing = size, split, seed, tools, phrasing

    @property
    def name(self) -> str:
        return "Arithmetic" + ("-Unseen" if self.phrasing == "unseen" else "") + ("" if self.tools else "-NoTool")

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"Arithmetic:{self.seed}:{self.split}:{self.phrasing}:{index}")
        op = rng.choice(OPS)
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        composed = kind == "story" and self.families[f"composed{op}"] and rng.random() < COMPOSED_SHARE
        frames = self.families[f"composed{op}" if composed else f"story{op}" if kind == "story" else kind]
        family = rng.choice(sorted(frames))
        if not composed:
            template = frames[family]
        elif frames[family] == "rate":
            template = compose_rate(rng, op, family)
        elif frames[family] == "pair":
            template = compose_pair(rng, family)
        else:
            template = compose_story(rng, op, family)
        if kind == "noun":
            template = template.replace("{q}", rng.choice(NOUN_PHRASES[op]))
        elif kind == "verb":
            phrase = rng.choice(VERB_PHRASES[op])
            template = template.replace("{V}", phrase[0].upper() + phrase[1:]).replace("{v}", phrase)
        elif kind == "noun-of":
            noun = rng.choice(NOUNS[op])
            template = template.replace("{noun}", noun).replace("{Noun}", noun.capitalize())
        story = kind == "story"
        measured = any(u in template for u in ("$}", " kg", " km", "liters", "meters"))  # counts of things stay whole
        while True:  # "the difference of 5 and 12" would be ambiguous: only bare phrases get negatives
            a, b = draw_problem(rng, op, decimals=measured or not story, negatives=kind in ("noun", "verb"))
            result = calculate(expression(op, a, b))
            if is_test_problem(op, a, b) == (self.split == "test") and len(result) <= 12 \
                    and not result.startswith("Error"):
                break
        symbolic = bool(re.search(r"\{a\} ?[-+*/x] ?\{b\}", template))
        shown = [write_number(rng, a, symbolic), write_number(rng, b, symbolic)]
        if story:
            money = rng.choice(["${}", "{} dollars"])
            template = template.replace("{a$}", with_unit(money, shown[0])).replace("{b$}", with_unit(money, shown[1]))
            a_text, b_text = shown
        elif rng.random() < 0.1:  # units on a bare question: "12 kg plus 7 kg", "40 km divided by 8"
            unit = rng.choice(UNITS)
            a_text, b_text = with_unit(unit, shown[0]), shown[1] if op == "/" else with_unit(unit, shown[1])
        else:
            a_text, b_text = shown
        name, pro = rng.choice(NAMES)
        question = template.format(a=a_text, b=b_text, name=name, pro=pro, Pro=pro.capitalize(),
                                   obj="him" if pro == "he" else "her", things=rng.choice(THINGS))
        question = add_noise(rng, question[0].upper() + question[1:])
        # + and * take their operands in the order the question names them ("Each bag weighs 12 kg. What do 30
        # bags weigh?" calls 12*30): copying in reading order, the model never has to look back for the first one
        b_first = op in "+*" and template.find("{b") < template.find("{a")
        expr = expression(op, *(shown[::-1] if b_first else shown))
        parts = [{"type": "python", "text": expr}, {"type": "python_output", "text": result},
                 {"type": "text", "text": ANSWER_TEXT.format(result)}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": result, "expression": expr, "problem": problem_key(op, a, b), "family": family,
                "operands": shown}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_match(final_number(completion), conversation["answer"])
