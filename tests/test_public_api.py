"""The public face: no ``Any`` in public signatures (but for the kinds listed), a ``Literal``
for every string mode, ``EMA`` with at most 20 public names, deprecated names that warn."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

import pytest
import torch

import polyak

MODULES = [
    "polyak",
    "polyak.schedules",
    "polyak.averages",
    "polyak.metrics",
    "polyak.files",
    "polyak.types",
    "polyak.workflows",
    "polyak.posthoc",
    "polyak.merge",
    "polyak.merge.weights",
    "polyak.integrations.lightning",
    "polyak.integrations.transformers",
    "polyak.integrations.accelerate",
    "polyak.errors",
    "polyak.export",
    "polyak.integrations.trl",
]

# Where Any stays, and why (each a reason a reader can check):
ALLOWED = [
    # state dicts hold tensors/arrays and plain Python data of several kinds, as torch's own
    # nn.Module.state_dict() -> dict[str, Any]
    (r"state_dict|stage_state|load_state_dict|\.state$|Listing\.__init__", r"(dict|Mapping)\[str"),
    # framework hooks: the frameworks call them with their own arguments
    (r"\.on_[a-z_]+$", r".*"),
    # keyword arguments forwarded to the framework's own save_pretrained
    (r"\.save_pretrained$", r"^Any$"),
]


def _public_callables():
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # an integration whose framework is not installed
            continue
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if member.startswith("_") and member != "__init__":
                        continue
                    fn = value.fget if isinstance(value, property) else value
                    fn = getattr(fn, "__func__", fn)
                    if inspect.isfunction(fn):
                        yield f"{name}.{attr}.{member}", fn
            elif inspect.isfunction(obj):
                yield f"{name}.{attr}", obj


def _allowed(where: str, annotation: str) -> bool:
    return any(re.search(w, where) and re.search(a, annotation) for w, a in ALLOWED)


def test_no_any_in_public_signatures():
    found = []
    for where, fn in _public_callables():
        for param, annotation in fn.__annotations__.items():
            text = str(annotation)
            if re.search(r"\bAny\b", text) and not _allowed(where, text):
                found.append(f"{where}({param}: {text})")
    assert not found, "\n".join(found)


# str parameters that name something open-ended (an average, a metric), not a mode
OPEN_STRINGS = {"final_weights", "monitor", "average", "name", "prefix", "note", "message", "what"}


def test_every_string_mode_is_a_literal():
    found = []
    for where, fn in _public_callables():
        for param in inspect.signature(fn).parameters.values():
            annotation = str(fn.__annotations__.get(param.name, ""))
            if (
                isinstance(param.default, str)
                and "Literal" not in annotation
                and param.name not in OPEN_STRINGS
                and not re.search(r"NonFinite|BufferPolicy|FrozenPolicy", annotation)
            ):
                found.append(f"{where}({param.name}: {annotation} = {param.default!r})")
    assert not found, "\n".join(found)


DEPRECATED = {
    "module": ("get_module()", lambda e: e.get_module()),
    "full_state_dict": ("state_dict(full=True)", None),
    "tensor_names": ("averaged_tensors", lambda e: list(e.averaged_tensors())),
    "num_updates": ("timeline.num_updates", lambda e: e.timeline.num_updates),
    "last_update_step": ("timeline.last_update_step", lambda e: e.timeline.last_update_step),
    "start_step": ("timeline.start_step", lambda e: e.timeline.start_step),
    "last_decays": ("timeline.last_decays", lambda e: e.timeline.last_decays),
    "sharded": ("layout", lambda e: any(t.sharded for t in e.layout().values())),
}


def test_ema_has_at_most_twenty_public_names_besides_the_deprecated():
    names = {n for n in dir(polyak.EMA) if not n.startswith("_")} - set(DEPRECATED)
    assert len(names) <= 20, sorted(names)
    assert {"update", "swapped", "apply_shadow", "restore", "copy_to", "state_dict"} <= names
    assert "update_lists" not in names


@pytest.mark.parametrize("old", sorted(DEPRECATED))
def test_deprecated_names_warn_and_give_the_same(old):
    ema = polyak.EMA(torch.nn.Linear(2, 2), 0.9, start_step=1)
    ema.update()
    new, read = DEPRECATED[old]
    with pytest.warns(
        DeprecationWarning, match=rf"{old}.*removed in polyak 0\.3\.0.*{re.escape(new)}"
    ):
        value = getattr(ema, old)
        if old == "full_state_dict":
            value = value()
    if old == "full_state_dict":
        assert value["averages"].keys() == ema.state_dict(full=True)["averages"].keys()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert value is read(ema) or value == read(ema)


def test_timeline_is_one_snapshot_of_every_counter():
    ema = polyak.EMA(torch.nn.Linear(2, 2), {"a": 0.9, "b": 0.5}, update_every=2, start_step=3)
    for _ in range(7):
        ema.update()
    t = ema.timeline
    assert (t.step, t.num_updates, t.last_update_step, t.start_step, t.update_every) == (
        7, 3, 6, 3, 2,
    )  # fmt: skip
    assert t.last_decays == {"a": pytest.approx(0.81), "b": 0.25}
    with pytest.raises(AttributeError):
        t.step = 0  # frozen


def test_layout_says_what_is_stored_for_each_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layout = polyak.EMA(model, 0.9, buffers="copy", dtype=torch.float64).layout()
    assert list(layout) == [n for n, _ in model.state_dict().items()]
    assert layout["0.weight"] == polyak.types.TensorLayout(
        "average", (2, 3), torch.float64, (2, 3), (0, 0)
    )
    assert layout["1.running_mean"].kind == "copied"
    assert layout["1.num_batches_tracked"].dtype == torch.int64
    assert not any(t.sharded for t in layout.values())
