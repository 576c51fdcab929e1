"""The instruction families of the miniature world, by name."""
from instructrl.data.families import base
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
