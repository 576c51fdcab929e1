"""The instruction families of the miniature world, by name."""
from instructrl.data.families import base
from instructrl.data.families import judged
from instructrl.data.families import structured
from instructrl.data.families import text

Family = base.Family
TEMPLATE_SPLITS = base.TEMPLATE_SPLITS

FAMILIES: dict[str, base.Family] = {
    f.name: f for f in (
        text.Reverse(), text.ChangeCase(), structured.Sort(),
        structured.Arithmetic(), text.Repeat(), text.CountLetter(),
        text.KthWord(), structured.ContextQA(), structured.ListItems())
}

# World v2 (issue 18; docs/design.md "World v2"): not in FAMILIES, so the
# default world (families="") stays the nine above, byte for byte.
V2_FAMILIES: dict[str, base.Family] = {
    f.name: f for f in (judged.Select(), judged.Lookup(), judged.Route())}
ALL_FAMILIES: dict[str, base.Family] = {**FAMILIES, **V2_FAMILIES}
