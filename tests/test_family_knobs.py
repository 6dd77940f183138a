"""model.image knobs declared once: each family lists its own, one generic check refuses the others.

Adding a family touches only its module and the family list: no family module names another family's knobs,
every config knob belongs to some family, each declared knob reaches the processor, and the refusal names the
knob, the families that have it and this family's own knobs.
"""

import copy
import inspect
import json
import re

import pytest

from vlm_tune.config import ImageSection
from vlm_tune.errors import UserError
from vlm_tune.families import all_families, apply_image_settings, image_knob_problems
from vlm_tune.families import load_processor as load_family_processor

FAMILIES = [f.name for f in all_families()]
KNOBS = list(ImageSection.model_fields)
# candidate values tried for a declared knob until one changes the processor (ints within the field's bounds)
INTS = [1, 2, 3, 4, 6, 8, 9, 16, 32, 48, 64, 96, 128, 256, 1024, 4096, 16384, 65536, 262144]


def fam(name):
    return next(f for f in all_families() if f.name == name)


def family_modules():
    """module → the families it defines (Qwen2.5-VL and Qwen3-VL share one)."""
    modules = {}
    for f in all_families():
        modules.setdefault(inspect.getmodule(f.apply_image_knobs), []).append(f)
    return modules


def stem(title):
    """The family's word as its messages would write it ("Qwen" for Qwen2.5-VL, "Gemma" for Gemma 3)."""
    return re.match(r"[A-Za-z]+", title).group(0)


@pytest.fixture(scope="module")
def processors(family_stand_ins):
    return {name: load_family_processor(str(path)) for name, path in family_stand_ins.items()}


def test_every_config_knob_is_declared_by_a_family_and_every_declared_knob_is_a_config_knob():
    declared = {k for f in all_families() for k in f.image_knobs}
    assert declared == set(KNOBS)
    for f in all_families():
        assert f.title and all(what and "\n" not in what for what in f.image_knobs.values()), f.name


@pytest.mark.parametrize("module", list(family_modules()), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_a_family_module_names_only_its_own_knobs(module):
    """No hand-written refusal of another family's knob: its knob names appear nowhere as model.image.X, nor
    in the code that sets this family's knobs, and no "<other family> knob" phrase is left."""
    families = family_modules()[module]
    own = {k for f in families for k in f.image_knobs}
    if any(f.fixed_edge is not None for f in families):
        own.add("longest_edge")  # accepted when it equals the fixed square (Family.fixed_edge)
    source = inspect.getsource(module)
    named = set(re.findall(r"model\.image\.(\w+)", source)) & set(KNOBS)
    assert named <= own, f"{module.__name__} names other families' knobs: {sorted(named - own)}"
    for f in families:
        for fn in (f.apply_image_knobs, f.card_image_lines, f.sizing_note):
            if inspect.getmodule(fn) is module:
                words = set(re.findall(r"\w+", inspect.getsource(fn))) & set(KNOBS)
                assert words <= own, f"{f.name}: {fn.__name__} reads {sorted(words - own)}"
    others = {stem(f.title) for f in all_families()} - {stem(f.title) for f in families}
    for other in others:
        assert not re.search(rf"\b{other}\b[^\n]{{0,20}}\bknobs?\b", source), (module.__name__, other)


def state(processor):
    """What model.image can change: the image processor's settings and the processor's image kwargs."""
    seen = {"ip": processor.image_processor.to_dict(), "kw": getattr(processor, "images_kwargs", None)}
    return json.dumps(seen, sort_keys=True, default=str)


def applied(family, processor, **image):
    p = copy.deepcopy(processor)
    apply_image_settings(family, p, ImageSection(**image))
    return state(p)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_declared_knob_changes_the_processor(name, processors):
    """Every knob a family declares is handled by its processor-setting code: some value of it (alone, or
    with one of the family's switches on, e.g. Gemma 3's max_crops with pan_and_scan) changes the processor."""
    f, processor = fam(name), processors[name]
    switches = [k for k in f.image_knobs if ImageSection.model_fields[k].annotation == bool | None]
    for knob in f.image_knobs:
        values = [True, False] if knob in switches else INTS
        changed = False
        for base in [{}] + [{s: True} for s in switches if s != knob]:
            for value in values:
                try:
                    changed = applied(f, processor, **base, **{knob: value}) != applied(f, processor, **base)
                except (UserError, ValueError):  # out of this family's range (e.g. min above max)
                    continue
                if changed:
                    break
            if changed:
                break
        assert changed, f"{name}: model.image.{knob} is declared but no value of it changes the processor"


def example(knob):
    """A valid value for `knob` that is not a stand-in's fixed square (64 px)."""
    return True if ImageSection.model_fields[knob].annotation == bool | None else 48


@pytest.mark.parametrize("name", FAMILIES)
def test_a_knob_the_family_lacks_is_refused_naming_who_has_it_and_the_own_knobs(name, processors):
    f, processor = fam(name), processors[name]
    lacking = [k for k in KNOBS if k not in f.image_knobs]
    assert lacking  # no family has every knob
    for knob in lacking:
        image = ImageSection(**{knob: example(knob)})
        (msg,) = image_knob_problems(f, processor, image)
        assert msg.startswith(f"model.image.{knob} does not apply to {f.title}")
        for owner in (g for g in all_families() if knob in g.image_knobs):
            assert owner.title in msg
        for own in f.image_knobs:
            assert f"model.image.{own}" in msg
        if not f.image_knobs:
            assert f"{f.title} has no model.image knobs" in msg
        with pytest.raises(UserError) as err:
            apply_image_settings(f, copy.deepcopy(processor), image)
        assert str(err.value) == msg  # through the same UserError path (exit code 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_lacking_knob_is_reported_at_once(name, processors):
    f, processor = fam(name), processors[name]
    lacking = [k for k in KNOBS if k not in f.image_knobs][:2]
    with pytest.raises(UserError) as err:
        apply_image_settings(f, copy.deepcopy(processor), ImageSection(**{k: example(k) for k in lacking}))
    lines = str(err.value).splitlines()
    assert [line.split(" ")[0] for line in lines] == [f"model.image.{k}" for k in lacking]
