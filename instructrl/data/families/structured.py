"""Families with structure: sort, arithmetic, closed-domain QA, lists.

Closed-domain QA is where the paper measures hallucination: the answer must
come from the given context, and "unknown" is right when it does not say.
The list family carries explicit constraints (how many, commas, "do not
include"), the paper's "follows explicit constraints" metadata.
"""
from instructrl.data import lexicon
from instructrl.data import utility
from instructrl.data.families import base

pick = base.pick

_ORDER_PHRASES = {
    "asc": ("from smallest to largest", "in ascending order"),
    "desc": ("from largest to smallest", "in descending order"),
}


def _draw_in_split(rng, split, draw, key_of):
  """Rejection-samples an entity from an unbounded space into `split`."""
  while True:
    value = draw()
    if lexicon.split_of(key_of(value)) == split:
      return value


class Sort(base.Family):
  """Sort 3-4 numbers, ascending or descending."""
  name = "sort"
  templates = (
      "Sort these numbers {order}: {nums}.",
      "Put {nums} {order}.",
      "Arrange the numbers {nums} {order}.",
      "Order these numbers {order}: {nums}.",
      "List {nums} sorted {order}.",
      "Please sort {order}: {nums}.",
      "Sort {nums} {order}.",
      "Can you rank the numbers {nums} {order}?",
      "Here are some numbers: {nums}. Write them {order}.",
      "Reorder {nums} {order}.",
  )

  def sample(self, rng, split):
    def draw():
      k = int(rng.integers(3, 5))
      return [int(x) for x in rng.choice(100, size=k, replace=False)]
    nums = _draw_in_split(rng, split, draw, self._key)
    direction = pick(rng, ("asc", "desc"))
    return {"nums": nums, "direction": direction,
            "order": pick(rng, _ORDER_PHRASES[direction])}

  def _key(self, nums):
    return "sort:" + ",".join(map(str, sorted(nums)))

  def fields(self, spec):
    return dict(spec, nums=", ".join(map(str, spec["nums"])))

  def entities(self, spec):
    return (self._key(spec["nums"]),)

  def _target(self, spec):
    return sorted(spec["nums"], reverse=spec["direction"] == "desc")

  def reference(self, spec):
    return ", ".join(map(str, self._target(spec)))

  def score(self, spec, response):
    target = self._target(spec)
    ws = utility.words(response)
    got = []
    for w in ws:
      value = utility.parse_int(w)
      if value is None:
        break
      got.append(value)
    extra = len(ws) - len(got)
    if got == target:
      return utility.Score(True, 1.0, extra)
    right = sum(a == b for a, b in zip(got, target)) / len(target)
    if sorted(got) == sorted(target):
      return utility.Score(False, 0.3 + 0.6 * right, extra)
    return utility.Score(False, 0.5 * right, extra)

  def corruptions(self, spec, rng):
    t = self._target(spec)
    i = int(rng.integers(len(t) - 1))
    swapped = t[:i] + [t[i + 1], t[i]] + t[i + 2:]
    fmt = lambda xs: ", ".join(map(str, xs))
    return [fmt(spec["nums"]), fmt(t[::-1]), fmt(swapped), fmt(t[:-1]),
            fmt(t[:i] + [t[i] + 1] + t[i + 1:])]


_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
        "*": ("times", lambda a, b: a * b)}


def _arith_key(op, a, b):
  return f"arith:{a}{op}{b}"


class Arithmetic(base.Family):
  """Small additions, subtractions and multiplications."""
  name = "arithmetic"
  templates = (
      "What is {a} {op_word} {b}?",
      "Compute {a} {op} {b}.",
      "Calculate {a} {op_word} {b}. Answer with just the number.",
      "Work out {a} {op} {b}.",
      "Find the value of {a} {op} {b}.",
      "How much is {a} {op_word} {b}?",
      "Solve: {a} {op} {b} = ?",
      "Tell me the result of {a} {op_word} {b}.",
      "What number is {a} {op_word} {b}?",
      "Evaluate the expression {a} {op} {b}.",
  )

  def sample(self, rng, split):
    def draw():
      op = pick(rng, "+-*")
      if op == "*":
        return op, int(rng.integers(2, 13)), int(rng.integers(2, 13))
      a, b = int(rng.integers(0, 51)), int(rng.integers(0, 51))
      return (op, max(a, b), min(a, b)) if op == "-" else (op, a, b)
    op, a, b = _draw_in_split(rng, split, draw, lambda v: _arith_key(*v))
    return {"a": a, "b": b, "op": op}

  def fields(self, spec):
    return dict(spec, op_word=_OPS[spec["op"]][0])

  def entities(self, spec):
    return (_arith_key(spec["op"], spec["a"], spec["b"]),)

  def _value(self, spec):
    return _OPS[spec["op"]][1](spec["a"], spec["b"])

  def reference(self, spec):
    return str(self._value(spec))

  def score(self, spec, response):
    return utility.score_number(response, self._value(spec))

  def corruptions(self, spec, rng):
    v = self._value(spec)
    wrong_op = [f(spec["a"], spec["b"]) for o, (_, f) in _OPS.items()
                if o != spec["op"]]
    return [str(v + 1), str(v - 1), str(v + 2), *map(str, wrong_op),
            str(v)[::-1] if v >= 10 else str(v + 10)]


class ContextQA(base.Family):
  """Answer only from a given context; "unknown" if it does not say."""
  name = "context_qa"
  templates = (
      "Context: {context} Where does {name} live?",
      "Read this: {context} Where does {name} live?",
      "{context} Using only this text, where does {name} live?",
      "Facts: {context} Which city is {name} in?",
      "{context} In which city does {name} live?",
      "Info: {context} Where is the home of {name}?",
      "{context} According to this, where does {name} live?",
      "Given that {context} where does {name} live?",
      "Passage: {context} Per the passage, where does {name} live?",
      "Only use this: {context} Name the city where {name} lives.",
  )

  def sample(self, rng, split):
    k = 2  # Two facts keep prompts under ~50 tokens.
    people = base.sample_distinct(rng, lexicon.names(split), k + 1)
    places = base.sample_distinct(rng, lexicon.cities(split), k)
    facts = [[p, c] for p, c in zip(people[:k], places)]
    # One question in five asks about someone the context does not mention.
    ask = people[k] if rng.random() < 0.2 else pick(rng, people[:k])
    return {"facts": facts, "name": ask}

  def fields(self, spec):
    context = " ".join(f"{p} lives in {c}." for p, c in spec["facts"])
    return {"context": context, "name": spec["name"]}

  def entities(self, spec):
    return tuple(x for fact in spec["facts"] for x in fact) + (spec["name"],)

  def reference(self, spec):
    return dict(spec["facts"]).get(spec["name"], "unknown")

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
    if ref == "unknown":
      return utility.Score(False, 0.0, extra)  # Any city is invented.
    context_cities = [c for _, c in spec["facts"]]
    if got in context_cities:
      return utility.Score(False, 0.2, extra)  # Wrong, but grounded.
    return utility.Score(False, 0.1 if got.lower() == "unknown" else 0.0,
                         extra)

  def corruptions(self, spec, rng):
    ref = self.reference(spec)
    cities = [c for _, c in spec["facts"]]
    outside = [c for c in lexicon.cities("train") if c not in cities]
    others = [c for c in cities if c != ref]
    return [pick(rng, others) if others else cities[0],
            pick(rng, outside),  # A hallucinated city.
            "unknown" if ref != "unknown" else cities[-1],
            spec["name"], f"{ref} or {pick(rng, cities)}"]


class ListItems(base.Family):
  """Name N members of a category, comma separated, maybe excluding one."""
  name = "list"
  templates = (
      "Name {n} {category}, separated by commas.",
      "List {n} {category}. Use commas between them.",
      "Give me exactly {n} {category}, comma separated.",
      "Write a comma-separated list of {n} {category}.",
      "Tell me {n} {category} separated by commas.",
      "I need {n} {category}. Separate them with commas.",
      "Please list {n} different {category}, with commas in between.",
      "Can you name {n} {category}, using commas?",
      "Come up with {n} {category} and separate them by commas.",
      "Produce a list of {n} {category}, split by commas.",
  )

  def sample(self, rng, split):
    category, n = pick(rng, lexicon.list_topics(split))
    members = lexicon.CATEGORIES[category]
    exclude = pick(rng, members) if rng.random() < 0.4 else None
    allowed = [m for m in members if m != exclude]
    return {"category": category, "count": n, "exclude": exclude,
            "as_word": bool(rng.random() < 0.5),
            "answer": base.sample_distinct(rng, allowed, n)}

  def fields(self, spec):
    n = spec["count"]
    return {"category": spec["category"],
            "n": lexicon.NUMBER_WORDS[n] if spec["as_word"] else str(n)}

  def render(self, spec, template):
    text = super().render(spec, template)
    if spec["exclude"]:
      text += f" Do not include {spec['exclude']}."
    return text

  def entities(self, spec):
    return ("list:%s/%d" % (spec["category"], spec["count"]),)

  def reference(self, spec):
    return ", ".join(spec["answer"])

  def score(self, spec, response):
    n, text = spec["count"], response.strip()
    broken = 0
    items = [i.strip() for i in text.split(",")]
    if len(items) == 1 and n > 1:
      items, broken = text.split(), 1  # Not comma separated.
    extra = 0
    heads = []
    for item in items:
      parts = item.split()
      heads.append(utility.strip_punct(parts[0]).lower() if parts else "")
      extra += max(0, len(parts) - 1)  # Words after an item are unasked for.
    members = set(lexicon.CATEGORIES[spec["category"]])
    broken += int(len(heads) != n) + int(spec["exclude"] in heads)
    valid = {h for h in heads[:n] if h in members and h != spec["exclude"]}
    exact = broken == 0 and len(valid) == n
    return utility.Score(exact, len(valid) / n, extra, broken)

  def corruptions(self, spec, rng):
    ans, members = spec["answer"], lexicon.CATEGORIES[spec["category"]]
    spare = [m for m in members if m not in ans]
    other = pick(rng, [c for c in lexicon.CATEGORIES if c != spec["category"]])
    wrong = ans[:-1] + [pick(rng, lexicon.CATEGORIES[other])]
    out = [", ".join(ans[:-1]), ", ".join(ans + spare[:1]), " ".join(ans),
           ", ".join(wrong)]
    if spec["exclude"]:
      out.append(", ".join(ans[:-1] + [spec["exclude"]]))
    else:
      out.append(", ".join(ans[:-1] + ans[:1]))  # A duplicate.
    return out
