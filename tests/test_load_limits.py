"""The loader's bounds (docs/checkpoints.md), each pinned at its boundary: a value at the bound is accepted, one
past it refused. Each test calls the function that does the check (the gated unpickler on a small crafted pickle,
the object-graph walk, the value schema, the zip directory reader), so the whole file runs in seconds.
tests/test_load_attacks.py shows the same checks refusing real attacks far past the bounds, in a fresh process;
tests/test_schema.py the schema's entries one past their bound (and the class names and image size at theirs)."""

import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from export.checkpoint import object_graph, schema, torch_zip
from export.checkpoint.object_graph import validate
from export.checkpoint.safe_pickle import ExpansionBudget, GatedUnpickler, Refused, UnpickleLog, unpickle
from tests.crafted import build, call, glob, newobj, pickle_of

MIB = 1 << 20


def _unpickle(value):
    """What the gated unpickler makes of a protocol-2 pickle of `value` (plain data and crafted opcodes)."""
    return unpickle(pickle_of(value), UnpickleLog(), None)


# ---- the gated unpickler ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, name", [("m" * 256, "Block"), ("fork.nn", "B" * 256), ("m", "B")])
def test_global_names_of_1_to_256_characters_resolve(module, name):
    assert _unpickle(glob(module, name)).origin == f"{module}.{name}"


@pytest.mark.parametrize("module, name", [("m" * 257, "Block"), ("fork.nn", "B" * 257)])
def test_global_names_of_257_characters_are_refused(module, name):
    with pytest.raises(Refused, match="malformed global name"):
        _unpickle(glob(module, name))


def test_256_distinct_unknown_globals_are_reported_the_257th_refused():
    known = [glob(f"fork{i}", "Block") for i in range(256)]
    assert len(set(_unpickle(known + known[:1]))) == 256  # a name seen before does not count again
    with pytest.raises(Refused, match="more than 256 distinct unknown globals"):
        _unpickle(known + [glob("fork256", "Block")])


def _size(dims):
    return call(glob("torch", "Size"), tuple(dims))


def test_tensor_shapes_of_16_dims_and_sizes_up_to_2_62():
    assert _unpickle(_size([1] * 16)) == torch.Size([1] * 16)
    assert _unpickle(_size([2 ** 62, 0])) == torch.Size([2 ** 62, 0])
    for past in ([1] * 17, [2 ** 62 + 1], [-1]):
        with pytest.raises(Refused, match="malformed torch.Size"):
            _unpickle(_size(past))


@pytest.mark.parametrize("key", [
    (0,) * 15,  # 16 values: the tuple and its 15 items
    ((0,) * 14,),  # nested: 16 values in all
    2 ** 31 - 1, -(2 ** 31 - 1), "k" * 1000,
    (None, True, 1.5, b"k", "k"),  # the other plain values a key may hold
])
def test_dict_keys_up_to_16_values_and_32_bit_ints(key):
    assert _unpickle({key: 1}) == {key: 1}


@pytest.mark.parametrize("key", [(0,) * 16, ((0,) * 15,), (0,) * 17, 2 ** 31, -(2 ** 31), float("inf"), float("nan"),
                                 (0, float("-inf"))])
def test_dict_keys_past_16_values_or_32_bit_ints_are_refused(key):
    with pytest.raises(Refused, match="dict key or set item"):
        _unpickle({key: 1})


def _block_with(attributes):
    return build(newobj(glob("fork.nn", "Block")), {f"a{i}": 0 for i in range(attributes)})


def test_an_object_with_4096_attributes_loads_4097_are_refused():
    assert len(_unpickle(_block_with(4096)).__dict__) >= 4096
    with pytest.raises(Refused, match="more than 4096 attributes"):
        _unpickle(_block_with(4097))


def test_100000_class_instances_load_one_more_is_refused():
    block = glob("fork.nn", "Block")
    assert len(_unpickle([newobj(block)] * 100_000)) == 100_000
    with pytest.raises(Refused, match="more than 100000 objects of classes"):
        _unpickle([newobj(block)] * 100_001)


@pytest.mark.parametrize("size", [1000, 600_000])
def test_work_budget_is_two_elements_per_pickle_byte_plus_a_mebi_element(size):
    """The gate's work budget for a pickle of `size` bytes: 2 x size + 2**20 elements touched (a str costs its
    length plus one)."""
    budget = 2 * size + MIB
    gate = GatedUnpickler(b"x" * size, UnpickleLog(), None)
    gate._charge("s" * (budget - 1))  # the whole budget, to the element
    with pytest.raises(Refused, match="far more work"):
        gate._charge(0)
    with pytest.raises(Refused, match="far more work"):
        GatedUnpickler(b"x" * size, UnpickleLog(), None)._charge("s" * budget)


def test_expanded_views_may_claim_64_mebi_elements_in_all():
    budget = ExpansionBudget()
    budget.spend(1)  # spent in parts, by each view
    budget.spend(64 * MIB - 1)
    with pytest.raises(Refused, match="expanded tensor views"):
        budget.spend(1)
    with pytest.raises(Refused, match="expanded tensor views"):
        ExpansionBudget().spend(64 * MIB + 1)


# ---- the object graph ---------------------------------------------------------------------------------------
def _nested(levels):
    """A list `levels` deep: [[[...[]...]]]."""
    value = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_nesting_of_100_levels_passes_101_is_refused():
    validate(_nested(100))
    with pytest.raises(Refused, match="nesting deeper than 100 levels"):
        validate(_nested(101))
    validate([_nested(99), _nested(99)])  # the root is a level too


def test_object_count_bound_at_the_limit(monkeypatch):
    """MAX_OBJECTS (5,000,000: too many to build here) is read by the walk at call time, so its comparison is
    pinned at a bound of 10; its value is pinned below."""
    monkeypatch.setattr(object_graph, "MAX_OBJECTS", 10)
    validate([[] for _ in range(9)])  # the root and 9 lists: 10 objects
    validate([[] for _ in range(5)] + [_nested(4)])  # 10 again, counted while 5 are open
    with pytest.raises(Refused, match="more than 10 objects"):
        validate([[] for _ in range(10)])
    with pytest.raises(Refused, match="more than 10 objects"):
        validate([[] for _ in range(5)] + [_nested(5)])  # 5 done and 6 open when the 11th comes


def test_the_walk_passes_arrays_and_tensors_as_values():
    validate({"array": np.zeros(3), "tensor": torch.zeros(3), "list": [np.ones(2)]})


def test_bounds_too_large_to_reach_in_a_unit_test():
    assert object_graph.MAX_OBJECTS == 5_000_000


def _fan(children, name="m"):
    """A Sequential holding one Identity `children` times: 1 + children module paths."""
    leaf, fan = nn.Identity(), nn.Sequential()
    fan._modules.update({f"{name}{i}": leaf for i in range(children)})
    return fan


def test_100000_module_paths_pass_one_more_is_refused():
    """A Sequential around the fan: its paths are its own plus the fan's 1 + children."""
    validate(nn.Sequential(_fan(99_998)))
    with pytest.raises(Refused, match="more than 100000 paths"):
        validate(nn.Sequential(_fan(99_999)))


def test_module_paths_add_up_along_a_chain(monkeypatch):
    """A chain of 3 modules has 3 paths from its root (each module adds itself to its children's count): at a bound
    of 3 it passes, at 2 it is refused. MAX_MODULE_PATHS is read at call time."""
    chain = nn.Sequential(nn.Sequential(nn.Identity()))
    monkeypatch.setattr(object_graph, "MAX_MODULE_PATHS", 3)
    validate(chain)
    monkeypatch.setattr(object_graph, "MAX_MODULE_PATHS", 2)
    with pytest.raises(Refused, match="more than 2 paths"):
        validate(chain)


def test_a_module_graph_held_outside_the_models_tree_is_bounded_too():
    """Module paths are counted from every module the walk found, not only from the first one's tree."""
    model = nn.Sequential(nn.Identity())
    model.extra = [_fan(99_999)]
    validate(model)
    model.extra = [_fan(100_000)]
    with pytest.raises(Refused, match="more than 100000 paths"):
        validate(model)


def test_member_names_of_64_characters_pass_65_are_refused():
    validate(_fan(1, name="a" * 63))  # the index makes it 64
    with pytest.raises(Refused, match="names are letters"):
        validate(_fan(1, name="a" * 64))


# ---- the value schema ---------------------------------------------------------------------------------------
def _holding(field, value, layer=nn.Sequential):
    module = layer()
    module.__dict__[field] = value
    return module


@pytest.mark.parametrize("field, at, past", [
    *((name, 8192, 8193) for name in ("c1", "c2", "c_", "dim", "in_channels", "out_channels", "groups", "g")),
    ("c1", 1, 0), ("n", 64, 65), ("n", 0, -1), ("n_iter", 16, 17), ("n_iter", 0, -1),
    ("kernel_size", 64, 65), ("kernel_size", 0, -1), ("kernel_size", (64, 64), (64, 65)), ("k", 64, 65),
    ("kernel_size", (1, 1, 1, 1), (1, 1, 1, 1, 1)), ("kernel_size", (1,), ()),  # 1 to 4 sizes
    ("num_heads", 256, 257), ("num_heads", 1, 0), ("nl", 8, 9), ("nl", 1, 0),
    ("input_resolution", (4096, 4096), (4096, 4097)), ("i", 1024, 1025), ("nc", 10_000, 10_001),
])
def test_module_fields_at_their_bound_pass_one_past_is_refused(field, at, past):
    """docs/checkpoints.md: channels up to 8192, repeat counts (n) up to 64, STA's n_iter up to 16, kernel sizes up
    to 64; image sides up to 4096, layer indices up to 1024, class counts up to 10,000."""
    schema.check_model(_holding(field, at))
    with pytest.raises(Refused, match=f"{field} = "):
        schema.check_model(_holding(field, past))


@pytest.mark.parametrize("layer, field, at, past", [
    (lambda: nn.ZeroPad2d(1), "padding", (256, 256, -256, -256), (257, 0, 0, 0)),
    (lambda: nn.ConstantPad3d(1, 0.0), "padding", (-256,) * 6, (0, 0, 0, 0, 0, -257)),
    (lambda: nn.Unfold(3), "kernel_size", 16, 17),
    (lambda: nn.Fold(8, 3), "kernel_size", (16, 16), (16, 17)),
    (lambda: nn.Fold(8, 3), "kernel_size", (1, 1), (1, 1, 1)), (lambda: nn.Unfold(3), "kernel_size", 1, 0),
    (lambda: nn.ZeroPad2d(1), "padding", (1,) * 6, (1,) * 7),
    *((lambda: nn.Unfold(3), name, 64, 65) for name in ("dilation", "padding", "stride")),
    *((lambda: nn.Unfold(3), name, 1, 0) for name in ("dilation", "stride")), (lambda: nn.Unfold(3), "padding", 0, -1),
    *((lambda: nn.Unfold(3), name, (2, 2), (2, 2, 2)) for name in ("dilation", "padding", "stride")),  # 1 or 2 sizes
])
def test_class_fields_at_their_bound_pass_one_past_is_refused(layer, field, at, past):
    """docs/checkpoints.md: a padding layer's widths at most 256 a side (up to 6 of them), Unfold/Fold's kernel at
    most 16 (and its dilation, padding and stride at most 64)."""
    schema.check_model(_holding(field, at, layer))
    with pytest.raises(Refused, match=f"{field} = "):
        schema.check_model(_holding(field, past, layer))


@pytest.mark.parametrize("names", [{-1: "a"}, {10_000: "a"}, {10_001: "a"}, {0: "a" * 257}])
def test_class_names_are_keyed_0_to_9999_and_at_most_256_characters(names):
    schema.check_names({9_999: "a" * 256})
    with pytest.raises(Refused, match="class name"):
        schema.check_names(names)


def test_10000_class_names_pass_10001_are_refused_by_their_count():
    schema.check_names({i: "c" for i in range(10_000)})
    with pytest.raises(Refused, match=r"10001 class names \(at most 10000\)"):
        schema.check_names({i: "c" for i in range(10_001)})


def test_training_image_sides_from_1_and_never_empty():
    assert schema.image_size(1, 32) == 32 and schema.image_size([1, 4096], 32) == [32, 4096]
    with pytest.raises(Refused, match="train_args imgsz"):
        schema.image_size([], 32)


def _model_of(layers):
    sequential = nn.Sequential(*(nn.Identity() for _ in range(layers)))
    for i, layer in enumerate(sequential):
        layer.i, layer.f = i, -1
    root = nn.Sequential()
    root._modules["model"] = sequential
    return root


def test_1024_layers_pass_1025_are_refused():
    schema.check_model(_model_of(23))  # a yolov8's
    schema.check_model(_model_of(1024))
    with pytest.raises(Refused, match="1025 layers"):
        schema.check_model(_model_of(1025))


def _buffer(module, view):
    module._buffers["view"] = view


def _attribute(module, view):
    module.view = view


def _listed(module, view):
    module.views = [torch.zeros(1, dtype=view.dtype), view]


@pytest.mark.parametrize("dtype, elements_per_gib", [(torch.float32, 1 << 28), (torch.float16, 1 << 28),
                                                     (torch.uint8, 1 << 30)])
@pytest.mark.parametrize("hold", [_buffer, _attribute, _listed])
def test_tensors_may_take_1_gib_once_cast_to_fp32(dtype, elements_per_gib, hold):
    """Expanded views of one element: no memory here, their full size once cast (floats at 4 bytes each), held as a
    buffer, an attribute or in a list attribute."""
    def holding(elements):
        module = nn.Sequential()
        hold(module, torch.zeros(1, dtype=dtype).expand(elements - (hold is _listed)))  # the list's own element
        return module

    schema.check_model(holding(elements_per_gib))
    with pytest.raises(Refused, match="more than 1024 MiB once cast to fp32"):
        schema.check_model(holding(elements_per_gib + 1))


# ---- the zip directory ----------------------------------------------------------------------------------------
def _zip64_tail(path, entries, size):
    """A sparse file ending in a zip64 end-of-central-directory record, its locator and the classic record, claiming
    `entries` records in a `size`-byte directory that starts at offset 0. Returns the file's size."""
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, 0)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, size, 1)
    classic = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.seek(size)
        f.write(record + locator + classic)
    return size + len(record + locator + classic)


def test_zip_directory_of_100000_records_and_16_mib_is_read(tmp_path):
    path = tmp_path / "at.pt"
    torch_zip._check_central_directory(path, _zip64_tail(path, 100_000, 16 * MIB))


@pytest.mark.parametrize("entries, size", [(100_001, 1024), (10, 16 * MIB + 1)])
def test_zip_directory_past_100000_records_or_16_mib_is_refused_before_reading_it(entries, size, tmp_path):
    path = tmp_path / "past.pt"
    with pytest.raises(Refused, match=f"a zip directory of {entries} records and {size >> 10} KiB "
                                      f"\\(at most 100000 records and 16 MiB"):
        torch_zip._check_central_directory(path, _zip64_tail(path, entries, size))


def test_a_torch_save_archive_is_far_inside_every_zip_bound(tmp_path):
    """The bounds refuse only what is past them: a real checkpoint's few records and small data.pkl open."""
    path = tmp_path / "small.pt"
    torch.save({"model": nn.Conv2d(3, 8, 3).state_dict()}, path)
    archive = torch_zip.open_torch_zip(path, path.stat().st_size)
    archive.archive.close()


def _records(n, pickle_bytes=100):
    first = SimpleNamespace(filename="archive/data.pkl", compress_type=0, compress_size=pickle_bytes,
                            file_size=pickle_bytes)
    return [first] + [SimpleNamespace(filename=f"archive/data/{i}", compress_type=0, compress_size=0, file_size=0)
                      for i in range(n - 1)]


def test_100000_zip_records_are_read_one_more_is_refused():
    torch_zip._check_records(_records(100_000), 100)
    with pytest.raises(Refused, match="more than 100000 zip records"):
        torch_zip._check_records(_records(100_001), 100)


def test_a_data_pkl_of_16_mib_is_read_one_byte_more_is_refused():
    assert torch_zip._top_folder(_records(1, 16 * MIB)) == "archive/"
    with pytest.raises(Refused, match="data.pkl of 16 MiB"):
        torch_zip._top_folder(_records(1, 16 * MIB + 1))

