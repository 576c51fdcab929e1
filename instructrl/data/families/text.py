"""Word-level families: reverse, change case, repeat, count letters, k-th word.

Answers are one to a few short words, so a 4-layer model can learn them, and
every score gives partial credit for near misses (one letter off, one copy
too many) so that the utility, and hence the reward, is graded.
"""
from instructrl.data import lexicon
from instructrl.data import utility
from instructrl.data.families import base

pick = base.pick


class Reverse(base.Family):
  """Reverse a word: 'apple' -> 'elppa'."""
  name = "reverse"
  templates = (
      "Reverse the word '{word}'.",
      "Write '{word}' backwards.",
      "Spell the word {word} in reverse order.",
      "What is '{word}' written backwards?",
      "Reverse the letters of '{word}'.",
      "Please write the word '{word}' from the last letter to the first.",
      "Turn '{word}' around, letter by letter.",
      "Give me '{word}' reversed.",
      "Flip the letters of the word '{word}' so it reads backwards.",
      "How is '{word}' spelled backwards?",
  )

  def sample(self, rng, split):
    return {"word": pick(rng, lexicon.words(split))}

  def entities(self, spec):
    return (spec["word"],)

  def reference(self, spec):
    return spec["word"][::-1]

  def score(self, spec, response):
    return utility.score_words(response, self.reference(spec))

  def corruptions(self, spec, rng):
    word, ref = spec["word"], self.reference(spec)
    i = int(rng.integers(len(ref) - 1))
    swapped = ref[:i] + ref[i + 1] + ref[i] + ref[i + 2:]
    dropped = ref[:i] + ref[i + 1:]
    return [word, swapped, dropped, ref.upper(), ref[1:] + ref[0]]


_CASE_PHRASES = {
    "upper": ("capital letters", "upper case", "all caps"),
    "lower": ("lowercase", "small letters"),
    "title": ("title case",),
}
_CASE_FN = {"upper": str.upper, "lower": str.lower, "title": str.title}


class ChangeCase(base.Family):
  """Upper, lower or title case: 'apple pie' -> 'APPLE PIE'."""
  name = "case"
  templates = (
      "Write '{text}' in {how}.",
      "Rewrite '{text}' using {how}.",
      "Convert '{text}' to {how}.",
      "Change '{text}' into {how}, please.",
      "Put '{text}' in {how}.",
      "Can you write '{text}' in {how}?",
      "Type '{text}' again in {how}.",
      "Give '{text}' back in {how}.",
      "Transform the phrase '{text}' into {how}.",
      "Please respond with '{text}' rewritten in {how}.",
  )

  def sample(self, rng, split):
    mode = pick(rng, ("upper", "lower", "title"))
    n = 1 + int(rng.random() < 0.4)
    phrase = " ".join(base.sample_distinct(rng, lexicon.words(split), n))
    # The input is never already in the target case.
    shown = phrase.upper() if mode == "lower" else phrase
    return {"words": phrase, "text": shown, "mode": mode,
            "how": pick(rng, _CASE_PHRASES[mode])}

  def entities(self, spec):
    return tuple(spec["words"].split())

  def reference(self, spec):
    return _CASE_FN[spec["mode"]](spec["words"])

  def score(self, spec, response):
    ref = self.reference(spec)
    n = len(ref.split())
    ws = utility.words(response)
    head = utility.strip_punct(" ".join(ws[:n]))
    extra = max(0, len(ws) - n)
    if head == ref:
      return utility.Score(True, 1.0, extra)
    if head.lower() == ref.lower():
      # Right letters, some in the wrong case: credit the fraction in case.
      right = sum(a == b for a, b in zip(head, ref) if a.isalpha())
      letters = sum(c.isalpha() for c in ref)
      return utility.Score(False, 0.2 + 0.6 * right / letters, extra)
    return utility.Score(
        False, 0.3 * utility.similarity(head.lower(), ref.lower()), extra)

  def corruptions(self, spec, rng):
    ref = self.reference(spec)
    others = [f(spec["words"]) for m, f in _CASE_FN.items()
              if m != spec["mode"]]
    i = int(rng.integers(len(ref)))
    typo = ref[:i] + ref[i + 1:] if len(ref) > 2 else ref + ref[-1]
    return [spec["text"], *others, typo, ref[0].swapcase() + ref[1:]]


class Repeat(base.Family):
  """Repeat a phrase N times, separated by spaces."""
  name = "repeat"
  templates = (
      "Repeat '{phrase}' {n} times.",
      "Say '{phrase}' {n} times.",
      "Write '{phrase}' {n} times, separated by spaces.",
      "Please repeat '{phrase}' exactly {n} times.",
      "Type '{phrase}' {n} times in a row.",
      "Echo '{phrase}' {n} times.",
      "I need '{phrase}' written {n} times.",
      "Output '{phrase}' {n} times.",
      "Give me {n} copies of '{phrase}'.",
      "Write out '{phrase}' {n} times over.",
  )

  def sample(self, rng, split):
    k = 1 + int(rng.random() < 0.25)
    phrase = " ".join(base.sample_distinct(rng, lexicon.words(split), k))
    # Two-word phrases only twice: answers stay under ~20 tokens.
    count = int(rng.integers(2, 5)) if k == 1 else 2
    return {"phrase": phrase, "count": count,
            "as_word": bool(rng.random() < 0.5)}

  def fields(self, spec):
    n = spec["count"]
    return {"phrase": spec["phrase"],
            "n": lexicon.NUMBER_WORDS[n] if spec["as_word"] else str(n)}

  def entities(self, spec):
    return tuple(spec["phrase"].split())

  def reference(self, spec):
    return " ".join([spec["phrase"]] * spec["count"])

  def score(self, spec, response):
    unit = spec["phrase"].split()
    ws = utility.words(response)
    copies, i = 0, 0
    while ws[i:i + len(unit)] and [
        utility.strip_punct(w) for w in ws[i:i + len(unit)]] == unit:
      copies, i = copies + 1, i + len(unit)
    # "cat, cat, cat" breaks "separated by spaces"; a final "." does not.
    run = ws[:i]
    inner = any(w != utility.strip_punct(w) for w in run[:-1])
    last = bool(run) and run[-1].rstrip(".") != utility.strip_punct(run[-1])
    broken = int(inner or last)
    n = spec["count"]
    credit = max(0.0, 1.0 - abs(copies - n) / n)
    return utility.Score(copies == n and not broken, credit, len(ws) - i,
                         broken)

  def corruptions(self, spec, rng):
    p, n = spec["phrase"], spec["count"]
    return [" ".join([p] * (n - 1)), " ".join([p] * (n + 1)),
            ", ".join([p] * n), p, f"{p} x{n}"]


class CountLetter(base.Family):
  """How many times a letter occurs in a word."""
  name = "count"
  templates = (
      "How many times does the letter '{letter}' appear in '{word}'?",
      "Count the letter '{letter}' in the word '{word}'.",
      "How many '{letter}' are in '{word}'?",
      "In the word '{word}', how many times does '{letter}' occur?",
      "Count how often '{letter}' appears in '{word}'.",
      "How many letters '{letter}' does the word '{word}' have?",
      "Number of '{letter}' letters in '{word}'?",
      "How often is the letter '{letter}' used in '{word}'?",
      "Count the occurrences of '{letter}' in the word '{word}'.",
      "What is the count of the letter '{letter}' in '{word}'?",
  )

  def sample(self, rng, split):
    word = pick(rng, lexicon.words(split))
    if rng.random() < 0.75:
      letter = pick(rng, word)  # Frequent letters are likelier: counts > 1.
    else:
      letter = pick(rng, [c for c in "abcdefghijklmnopqrstuvwxyz"
                          if c not in word])
    return {"word": word, "letter": letter}

  def entities(self, spec):
    return (spec["word"],)

  def reference(self, spec):
    return str(spec["word"].count(spec["letter"]))

  def score(self, spec, response):
    return utility.score_number(response, spec["word"].count(spec["letter"]))

  def corruptions(self, spec, rng):
    c = spec["word"].count(spec["letter"])
    return [str(c + 1), str(abs(c - 1)), str(c + 2), str(len(spec["word"])),
            spec["letter"]]


class KthWord(base.Family):
  """Pick the k-th word of a short sentence."""
  name = "kth_word"
  templates = (
      "What is the {ordinal} word in '{sentence}'?",
      "Give the {ordinal} word of this sentence: {sentence}",
      "Which word comes {ordinal} in '{sentence}'?",
      "Here is a sentence: '{sentence}'. What is its {ordinal} word?",
      "Pick the {ordinal} word from '{sentence}'.",
      "Tell me word number {k} in '{sentence}'.",
      "In '{sentence}', which word is {ordinal}?",
      "Return the {ordinal} word of '{sentence}'.",
      "Look at '{sentence}' and name the {ordinal} word.",
      "From the words '{sentence}', write only the {ordinal} one.",
  )

  def sample(self, rng, split):
    n = int(rng.integers(4, 6))
    ws = base.sample_distinct(rng, lexicon.words(split), n)
    return {"sentence": " ".join(ws), "k": int(rng.integers(1, n + 1))}

  def fields(self, spec):
    return dict(spec, ordinal=lexicon.ORDINALS[spec["k"] - 1])

  def entities(self, spec):
    return tuple(spec["sentence"].split())

  def reference(self, spec):
    return spec["sentence"].split()[spec["k"] - 1]

  def score(self, spec, response):
    ws = utility.words(response)
    if not ws:
      return utility.Score(False)
    got, ref = utility.strip_punct(ws[0]), self.reference(spec)
    extra = len(ws) - 1
    if got == ref:
      return utility.Score(True, 1.0, extra)
    if got.lower() == ref.lower():
      return utility.Score(False, 0.8, extra)
    # A word of the sentence at the wrong place beats an invented one.
    in_sentence = got in spec["sentence"].split()
    return utility.Score(False, 0.25 if in_sentence else 0.0, extra)

  def corruptions(self, spec, rng):
    ws, k = spec["sentence"].split(), spec["k"]
    near = ws[k] if k < len(ws) else ws[k - 2]
    return [near, ws[0] if k != 1 else ws[-1], spec["sentence"],
            " ".join(ws[k - 1:k + 1]) if k < len(ws) else near.upper(),
            self.reference(spec).upper()]
