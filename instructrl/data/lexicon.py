"""The entities of the miniature world, and their split by "customer".

Every pool is partitioned once, deterministically: entities are sorted by a
stable hash and dealt 8:1:1 to train, validation and test, so each split gets
an exact share and nothing seen in training prompts reappears in test ones.
Words are short (3-6 letters) so that a tiny model can spell them out.
"""
import functools

from instructrl.data import common

CATEGORIES = {
    "colors": "red blue green yellow black white pink brown gray orange purple",
    "animals": "cat dog cow pig horse sheep goat fox wolf bear lion duck mouse",
    "fruits": "apple pear plum grape lemon lime peach mango cherry melon",
    "vegetables": "carrot potato onion leek pea bean corn garlic celery",
    "shapes": "circle square oval cube cone sphere",
    "instruments": "piano drum flute harp violin guitar cello trumpet",
    "body parts": "arm leg hand foot head knee ear nose eye neck",
    "tools": "hammer saw drill wrench axe chisel shovel rake",
}
CATEGORIES = {k: tuple(v.split()) for k, v in CATEGORIES.items()}

_WORDS = """
able acid aged also area army away baby back ball band bank base bath bird
blow boat body bone book born boss both bowl busy cake calm camp card care case
cash cell chat city clay club coal coat code coin cold cook cool copy cost crew
crop dark data date dawn deal deep desk diet dirt disk door dose down draw drop
dust duty earn east easy edge else even exam exit face fact fail fair fall farm
fast fear feel file film find fine fire firm fish flag flat flow folk food form
fuel full fund gain game gate gift girl glad goal gold golf good grow hair half
hall hard heat help hero hill hint hold hole home hope host hour huge idea inch
iron item join joke jump jury keep kind king kiss knot lack lake lamp land lane
last late lawn lead leaf lend life lift line link list load loan lock long loss
loud love luck mail main make mark meal meat menu mild milk mind mine miss mode
moon more most move much name navy near neat news next nice node note open oven
page pain pair park part pass past path peak pick pile pine plan play plot poem
poet pole pool poor port post pull pure push race rain rank rare rate read real
rest rice rich ride ring rise risk road rock role roof room root rope rose rule
safe sail salt sand save seat seed self sell send ship shoe shop shot show sick
side sign silk sing site size skin slow snow soft soil song sort soup spot star
stay step stop suit sure swim tail take talk tall tank tape task team tent term
test text thin tide tile time tiny tone tool tour town tree trip true tube tune
turn type unit upon used user vast verb very view vote wage wait wake walk wall
want warm wash wave weak wear week well west wide wife wild wind wine wing wire
wise wish wood wool word work yard year zero zone
acorn actor adult agent alarm album alert angle apron arena arrow aside asset
atlas award badge baker basin beach berry blank blend block bloom board bonus
boost brain brand bread brick bride brief broom brush cabin cable camel candy
canoe cargo chain chair chalk charm chart chess chief child cider civic claim
class clerk cliff clock cloud coach coast comet coral couch cover craft crane
crowd crown curve cycle daily dance delta depot diary dough draft drama dream
dress drink eagle earth elbow ember entry equal event fable faith fence ferry
fever field flame flask fleet float flood floor flour focus forge frame fresh
frost giant glass globe glove grain grass guard guest guide habit heart honey
hotel house image index ivory jelly jewel judge juice kayak label lapel laser
layer lemur level light linen lodge logic lunch magic maple march match medal
metal meter model money motor mound music noble noise novel ocean olive opera
orbit otter owner paint panel paper party pasta patch pearl pedal penny phone
photo pilot pizza place plane plant plate point polar pound power press pride
prize proof pulse quest queen quiet radar radio ranch raven river robin robot
round route royal ruler salad sauce scale scarf scene scout shade shape share
shelf shell shirt sight skill slate sleep slice smile smoke snack snake solar
sound space spark spice spine sport spray staff stage stamp steam steel stick
stone storm story stove sugar sweet table taste teach theme thumb tiger toast
token topic torch tower track trade trail train treat trend trial truck trust
tulip uncle union urban valid value valve vapor video villa vinyl visit vocal
voice wagon watch water whale wheat wheel world yacht young
"""

_NAMES = """
Ana Ben Cara Dan Eva Finn Gia Hugo Ida Jack Kim Leo Mia Nora Omar Pia Quinn
Rosa Sam Tara Uma Vic Will Xena Yara Zoe Alex Bea Carl Dora Eli Fay Gus Hana
Ivan Jade Kai Lily Max Nina Otto Paul Ruth Saul Tina Ugo Vera Wes Yuri Zack
Amir Beth Cole Dina Emil Fred Gwen Hal Iris Joel
"""

_CITIES = """
Oslo Lima Rome Paris Cairo Delhi Tokyo Seoul Dubai Quito Bern Riga Kyiv Baku
Doha Nice Lyon Porto Split Malmo Turin Milan Perth Leeds York Bath Cork Derry
Hanoi Dhaka Minsk Sofia Tunis Accra Dakar Lagos Havana Austin Boston Denver
Dallas Miami Tampa Reno Salem Boise Fargo Omaha Macon Oxford Berlin Madrid
Vienna Prague Warsaw Dublin Athens Lisbon Zagreb Nairobi
"""

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# Split buckets out of ten: 0-7 train, 8 validation, 9 test.
_BUCKET_SPLIT = ("train",) * 8 + ("validation", "test")


def split_of(key: str) -> str:
  """The split of an entity from an unbounded space (numbers, tuples)."""
  return _BUCKET_SPLIT[common.stable_hash("entity", key) % 10]


def partition(items, salt: str) -> dict[str, tuple]:
  """Deals a finite pool to the splits in exact 8:1:1 proportions."""
  ranked = sorted(items, key=lambda x: common.stable_hash(salt, x))
  out = {s: [] for s in common.SPLITS}
  for i, item in enumerate(ranked):
    out[_BUCKET_SPLIT[i % 10]].append(item)
  return {s: tuple(sorted(v)) for s, v in out.items()}


def _category_members() -> set[str]:
  return {w for members in CATEGORIES.values() for w in members}


@functools.lru_cache(maxsize=None)
def words(split: str) -> tuple[str, ...]:
  """Short common words of `split` (never a member of a list category)."""
  excluded = _category_members()
  pool = sorted({w for w in _WORDS.split() if 3 <= len(w) <= 6} - excluded)
  return partition(pool, "words")[split]


# Names and cities of at most five letters keep the context short in tokens.


@functools.lru_cache(maxsize=None)
def names(split: str) -> tuple[str, ...]:
  pool = sorted({n for n in _NAMES.split() if len(n) <= 5})
  return partition(pool, "names")[split]


@functools.lru_cache(maxsize=None)
def cities(split: str) -> tuple[str, ...]:
  pool = sorted({c for c in _CITIES.split() if len(c) <= 5})
  return partition(pool, "cities")[split]


@functools.lru_cache(maxsize=None)
def list_topics(split: str) -> tuple[tuple[str, int], ...]:
  """(category, how many) pairs: the entities of the list family."""
  pairs = [(c, n) for c in sorted(CATEGORIES) for n in (2, 3, 4)]
  return partition(pairs, "list")[split]
