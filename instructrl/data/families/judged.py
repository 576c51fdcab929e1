"""World v2 families: answers a small reward model can judge from surface facts.

Issue 18: comparing must be easier than generating. Each family's quality is
read off facts visible in the prompt and the response -- which listed items
are named and how many, whether an excluded item appears, whether the asked
name is in the context at all, whether every hop of a route is a listed road
-- while producing the right answer needs a plan (filter, look up, search).

Splits are by template and by combination, not by vocabulary (the paper
splits by customer, not by word): every split draws from the same short,
common words; a prompt's combination key is dealt to one split
(`lexicon.split_of`), and templates 7 / 8-9 stay held out as in base.py.

Each family also has `mistakes`: what an imperfect demonstration writer does
(copy the whole list, confabulate, take a long way), used by
`WorldConfig.demo_errors`.
"""
from instructrl.data import lexicon
from instructrl.data import utility
from instructrl.data.families import base

pick = base.pick

# Short words shared by every split (one category per "kind" of item).
_KINDS = {
    "animals": ("cat", "dog", "cow", "pig", "fox", "bear", "lion", "duck"),
    "colors": ("red", "blue", "green", "black", "white", "pink", "gray"),
    "fruits": ("apple", "pear", "plum", "lemon", "lime", "peach", "mango"),
    "tools": ("saw", "drill", "axe", "rake", "hammer", "wrench"),
}
_PEOPLE = ("Ana", "Ben", "Dan", "Eva", "Kim", "Leo", "Mia", "Sam", "Max",
           "Zoe", "Tom", "Joe")
_PLACES = ("A", "B", "C", "D", "E", "F", "G", "H")
UNKNOWN = "unknown"


def _draw(rng, split, draw, key_of):
  """Rejection-samples a combination whose key is dealt to `split`."""
  while True:
    value = draw()
    if lexicon.split_of(key_of(value)) == split:
      return value


def _names(response):
  return [utility.strip_punct(w) for w in response.replace(",", " ").split()]


class Select(base.Family):
  """Name the listed items of one kind, leaving one named item out."""
  name = "select"
  templates = (
      "Items: {items}. Name the {kind}, but not {skip}.",
      "From {items}, list the {kind} except {skip}.",
      "Which of {items} are {kind}? Leave out {skip}.",
      "List every one of the {kind} in {items}, without {skip}.",
      "Here is a list: {items}. Write the {kind} in it but skip {skip}.",
      "Pick the {kind} from {items}. Do not include {skip}.",
      "Among {items}, name the {kind} other than {skip}.",
      "Given {items}, say which are {kind}, excluding {skip}.",
      "Look at {items}. Give the {kind}, and not {skip}.",
      "Out of {items}, name all {kind} apart from {skip}.",
  )

  def sample(self, rng, split):
    def draw():
      kind, other = base.sample_distinct(rng, sorted(_KINDS), 2)
      n_in = int(rng.integers(3, 5))
      n_out = int(rng.integers(2, 4))
      ins = base.sample_distinct(rng, _KINDS[kind], n_in)
      outs = base.sample_distinct(rng, _KINDS[other], n_out)
      items = [(w, True) for w in ins] + [(w, False) for w in outs]
      items = [items[int(i)] for i in rng.permutation(len(items))]
      skip = pick(rng, ins)
      return kind, tuple(w for w, _ in items), tuple(ins), skip
    kind, items, ins, skip = _draw(rng, split, draw, self._key)
    return {"kind": kind, "items": list(items), "members": sorted(ins),
            "skip": skip}

  def _key(self, v):
    return "select:" + v[0] + ":" + ",".join(sorted(v[1])) + ":" + v[3]

  def fields(self, spec):
    return dict(spec, items=", ".join(spec["items"]))

  def entities(self, spec):
    return (self._key((spec["kind"], spec["items"], None, spec["skip"])),)

  def _target(self, spec):
    return [w for w in spec["items"]
            if w in spec["members"] and w != spec["skip"]]

  def reference(self, spec):
    return ", ".join(self._target(spec))

  def score(self, spec, response):
    target = set(self._target(spec))
    got = _names(response)
    listed = set(spec["items"])
    named = [w for w in got if w in listed]
    extra = len(got) - len(named)
    broken = int(spec["skip"] in named)
    hits = len(target & set(named))
    wrong = len(set(named) - target - {spec["skip"]})
    if set(named) == target and len(named) == len(target):
      return utility.Score(True, 1.0, extra, 0)
    credit = max(0.0, (hits - wrong) / len(target)) * 0.6
    return utility.Score(False, credit, extra, broken)

  def mistakes(self, spec, rng):
    t = self._target(spec)
    return [", ".join(spec["items"]),  # copies the whole list
            ", ".join(w for w in spec["items"] if w in spec["members"]),
            ", ".join(t[:-1]) if len(t) > 1 else spec["skip"]]

  def corruptions(self, spec, rng):
    t = self._target(spec)
    others = [w for w in spec["items"] if w not in spec["members"]]
    return self.mistakes(spec, rng) + [
        ", ".join(t + [pick(rng, others)]), ", ".join(others)]


class Lookup(base.Family):
  """Who has what: answer from the context, or "unknown" if it is silent."""
  name = "lookup"
  templates = (
      "{facts} What does {who} have?",
      "{facts} Which item belongs to {who}?",
      "Facts: {facts} Question: what is {who}'s item?",
      "{facts} Say what {who} has, or unknown.",
      "Read: {facts} What has {who} got?",
      "{facts} Tell me {who}'s thing.",
      "Context: {facts} What does {who} own?",
      "{facts} Name the item {who} holds.",
      "Notes: {facts} What is held by {who}?",
      "{facts} Answer from the text: what does {who} have?",
  )

  def sample(self, rng, split):
    pool = sum((list(v) for v in _KINDS.values()), [])
    def draw():
      n = int(rng.integers(3, 5))
      people = base.sample_distinct(rng, _PEOPLE, n + 1)
      things = base.sample_distinct(rng, pool, n)
      asked = people[int(rng.integers(n))] if rng.random() < 0.6 else people[n]
      return tuple(zip(people[:n], things)), asked
    facts, asked = _draw(rng, split, draw, self._key)
    return {"facts": [list(f) for f in facts], "who": asked}

  def _key(self, v):
    return "lookup:" + ",".join(f"{p}={t}" for p, t in v[0]) + ":" + v[1]

  def fields(self, spec):
    facts = " ".join(f"{p} has a {t}." for p, t in spec["facts"])
    return dict(spec, facts=facts)

  def entities(self, spec):
    return (self._key((tuple(map(tuple, spec["facts"])), spec["who"])),)

  def reference(self, spec):
    return dict(map(tuple, spec["facts"])).get(spec["who"], UNKNOWN)

  def score(self, spec, response):
    got = _names(response)
    if not got:
      return utility.Score(False)
    ref, head, extra = self.reference(spec), got[0].lower(), len(got) - 1
    if head == ref.lower():
      return utility.Score(True, 1.0, extra)
    if ref == UNKNOWN:  # Confabulation: an item the context never gave them.
      return utility.Score(False, 0.0, extra, broken=1)
    return utility.Score(False, 0.15 if head == UNKNOWN else 0.0, extra)

  def mistakes(self, spec, rng):
    things = [t for _, t in spec["facts"]]
    ref = self.reference(spec)
    wrong = [t for t in things if t != ref]
    return [pick(rng, wrong), UNKNOWN if ref != UNKNOWN else pick(rng, wrong)]

  def corruptions(self, spec, rng):
    things = [t for _, t in spec["facts"]]
    return self.mistakes(spec, rng) + [spec["who"], ", ".join(things)]


class Route(base.Family):
  """A shortest route over listed roads."""
  name = "route"
  templates = (
      "Roads: {roads}. Give the shortest route from {src} to {dst}.",
      "With roads {roads}, how do I get from {src} to {dst} fastest?",
      "Map: {roads}. Shortest path {src} to {dst}?",
      "The roads are {roads}. Route from {src} to {dst} in fewest hops.",
      "Given roads {roads}, list the stops from {src} to {dst}.",
      "Roads {roads}. Travel from {src} to {dst} by the shortest way.",
      "Using only {roads}, find the quickest route {src} to {dst}.",
      "There are roads {roads}. Go from {src} to {dst} as fast as possible.",
      "Network: {roads}. Name the shortest trip from {src} to {dst}.",
      "Roads: {roads}. What is the fewest-hop route from {src} to {dst}?",
  )

  def sample(self, rng, split):
    def draw():
      nodes = base.sample_distinct(rng, _PLACES, 5)
      # A chain src..dst of 4 hops plus one shortcut: the long way is legal.
      i = int(rng.integers(0, 2))
      roads = [(nodes[k], nodes[k + 1]) for k in range(4)]
      roads.append((nodes[i], nodes[i + 2 + int(rng.integers(0, 2))]))
      roads = [roads[int(k)] for k in rng.permutation(len(roads))]
      return tuple(roads), nodes[0], nodes[4]
    roads, src, dst = _draw(rng, split, draw, self._key)
    return {"roads": [list(r) for r in roads], "src": src, "dst": dst}

  def _key(self, v):
    return "route:" + ",".join("-".join(r) for r in v[0]) + f":{v[1]}{v[2]}"

  def fields(self, spec):
    return dict(spec, roads=", ".join("-".join(r) for r in spec["roads"]))

  def entities(self, spec):
    return (self._key((tuple(map(tuple, spec["roads"])), spec["src"],
                       spec["dst"])),)

  def _adj(self, spec):
    adj = {}
    for a, b in spec["roads"]:
      adj.setdefault(a, set()).add(b)
      adj.setdefault(b, set()).add(a)
    return adj

  def _paths(self, spec):
    """Shortest and longest simple paths src -> dst (breadth-first)."""
    adj, out, stack = self._adj(spec), [], [[spec["src"]]]
    while stack:
      path = stack.pop()
      if path[-1] == spec["dst"]:
        out.append(path)
        continue
      stack.extend(path + [n] for n in sorted(adj[path[-1]]) if n not in path)
    out.sort(key=lambda p: (len(p), p))
    return out[0], out[-1]

  def reference(self, spec):
    return " ".join(self._paths(spec)[0])

  def score(self, spec, response):
    got = _names(response)
    places = [w for w in got if w in _PLACES]
    extra = len(got) - len(places)
    if not places:
      return utility.Score(False, 0.0, extra)
    adj = self._adj(spec)
    hops = list(zip(places, places[1:]))
    legal = sum(b in adj.get(a, ()) for a, b in hops)
    ends = places[0] == spec["src"] and places[-1] == spec["dst"]
    shortest = len(self._paths(spec)[0])
    if ends and hops and legal == len(hops):
      if len(places) == shortest:
        return utility.Score(True, 1.0, extra)
      return utility.Score(False, 0.5, extra)  # A legal but longer route.
    credit = 0.3 * legal / max(len(hops), 1) if ends else 0.0
    return utility.Score(False, credit, extra, broken=len(hops) - legal)

  def mistakes(self, spec, rng):
    short, long = self._paths(spec)
    return [" ".join(long),  # plans badly: the legal long way round
            f"{spec['src']} {spec['dst']}"]  # a road that is not listed

  def corruptions(self, spec, rng):
    short = self._paths(spec)[0]
    return self.mistakes(spec, rng) + [
        " ".join(short[::-1]), " ".join(short[:-1]),
        " ".join(sorted(self._adj(spec)))]
