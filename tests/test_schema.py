"""The value schema (export/checkpoint/schema.py): every field real models hold is listed and within its bound,
every entry refuses a value past its bound, and the model-wide checks refuse what a field check cannot see."""

import copy
import glob
import os
import re

import pytest
import torch
import ultralytics
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import models
from export.checkpoint import schema
from export.checkpoint.loader import _pick_model, read
from export.checkpoint.safe_pickle import Refused

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("seg", "pose", "obb", "cls", "world", "rtdetr", "yoloe")  # not the detect task


def _yamls():
    root = os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models")
    found = [y for y in sorted(glob.glob(f"{root}/*/*.yaml")) if not any(t in os.path.basename(y) for t in SKIP)]
    return found + [str(p) for p in models.CFG_DIR.glob("*.yaml")]


@pytest.fixture(scope="module")
def real_models():
    """Every detection model ultralytics ships a YAML for (smallest scale), ours, and the demo checkpoints."""
    built = {}
    for path in _yamls():
        try:
            built[os.path.basename(path)] = DetectionModel(path, nc=80, verbose=False)
        except Exception:  # a YAML of another task or one needing extra packages
            continue
    for path in sorted((models.DEMO_DIR).glob("*.pt")):
        ckpt, _ = read(path)
        built[path.name] = _pick_model(ckpt, path)[0]
    assert len(built) > 20
    return built


# The torch layers of the table with representative constructor arguments, by class name (the table skips names
# this torch lacks). Every one is built: a layer holding a field the schema does not list fails the tests below.
TORCH_LAYER_ARGS = {
    **dict.fromkeys(("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"), (4, 8, 3)),
    **dict.fromkeys((f"{kind}{d}d" for kind in ("MaxPool", "AvgPool", "MaxUnpool") for d in (1, 2, 3)), (2,)),
    **dict.fromkeys((f"LPPool{d}d" for d in (1, 2, 3)), (2, 3)),
    **dict.fromkeys((f"Adaptive{kind}Pool{d}d" for kind in ("Avg", "Max") for d in (1, 2, 3)), (1,)),
    "AdaptiveAvgPool2d": ((None, 7),),
    **dict.fromkeys((f"{kind}Pad{d}d" for kind in ("Zero", "Reflection", "Replication", "Circular") for d in (1, 2, 3)),
                    (1,)),
    **dict.fromkeys((f"ConstantPad{d}d" for d in (1, 2, 3)), (1, 0.5)),
    **dict.fromkeys(("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
                     "InstanceNorm3d", "LayerNorm", "RMSNorm", "PReLU"), (4,)),
    "GroupNorm": (2, 4), "LocalResponseNorm": (2,), "Threshold": (0.1, 0.0), "MultiheadAttention": (16, 4),
    "Fold": ((4, 4), 2), "Unfold": (2,), "PixelShuffle": (2,), "PixelUnshuffle": (2,), "ChannelShuffle": (2,),
    "Upsample": (None, 2.0), "UpsamplingNearest2d": (None, 2), "UpsamplingBilinear2d": (None, 2),
    "Unflatten": (1, (2, 2)),
    "Linear": (2, 2), "NonDynamicallyQuantizableLinear": (2, 2), "Bilinear": (2, 2, 2), "Embedding": (10, 4),
    "Sequential": (nn.Conv2d(1, 1, 1),), "ModuleList": ([nn.ReLU()],), "ModuleDict": ({"act": nn.ReLU()},),
    "ParameterList": ([nn.Parameter(torch.zeros(1))],), "ParameterDict": ({"w": nn.Parameter(torch.zeros(1))},),
    # torchvision's own modules
    "DeformConv2d": (4, 4, 3), "SqueezeExcitation": (8, 2), "FrozenBatchNorm2d": (4,), "StochasticDepth": (0.1, "row"),
    "Conv2dNormActivation": (4, 4), "Conv3dNormActivation": (4, 4), "MLP": (4, [8, 4]), "Permute": ([0, 2, 3, 1],),
}
TORCH_LAYER_KWARGS = {  # values that set the optional fields, within their bounds
    "Conv2d": {"padding": 1, "padding_mode": "reflect"}, "Conv1d": {"padding": "same", "padding_mode": "circular"},
    "MultiheadAttention": {"kdim": 8, "vdim": 8, "batch_first": True}, "AvgPool2d": {"divisor_override": 4},
    "Embedding": {"padding_idx": 0, "max_norm": 1.0}, "RMSNorm": {"eps": 1e-6}, "GELU": {"approximate": "tanh"},
}


def _torch_layer(cls):
    return cls(*TORCH_LAYER_ARGS.get(cls.__name__, ()), **TORCH_LAYER_KWARGS.get(cls.__name__, {}))


def test_real_models_pass_and_hold_only_listed_fields(real_models):
    from export.checkpoint.safe_pickle import TORCH_LAYERS

    seen = set()
    layers = {cls.__name__: _torch_layer(cls) for cls in TORCH_LAYERS}
    for name, model in {**real_models, **layers}.items():
        schema.check_model(model)
        for _, m in schema._named_modules(model):
            seen |= {(type(m), k) for k in m.__dict__ if not k.startswith("_") and k != "training"}
    unlisted = {(c.__name__, k) for c, k in seen if k not in schema.CLASS_FIELDS.get(c, {}) and k not in schema.FIELDS}
    assert unlisted == set(), "fields real models hold that the schema does not list"
    names = {(c.__name__, k) for c, k in seen}
    assert {("SPPF", "n"), ("StokenAttention", "n_iter"), ("RepConv", "c1"), ("Detect", "f")} <= names


def test_every_table_class_we_can_build_holds_only_listed_fields():
    """The class table's module classes: every torch layer with its representative arguments, the others with
    small guessed ones (the heads and a few attention parts need more; the real models above cover those). A
    private field is listed too unless nn.Module itself holds it."""
    from export.checkpoint.safe_pickle import FAMILY_CLASSES, MODULE_CLASSES, TORCH_LAYERS, YOLOV5_CLASSES

    classes = set(MODULE_CLASSES.values()) | set(FAMILY_CLASSES.values()) | set(YOLOV5_CLASSES.values())
    module_own = set(nn.Module().__dict__)
    built, unlisted = 0, set()
    for cls in classes:
        guesses = [(), (16,), (16, 16), (16, 16, 1), (16, 16, 16)]
        module = _torch_layer(cls) if cls in TORCH_LAYERS else next(filter(None, (_try(cls, a) for a in guesses)), None)
        if module is None:
            continue
        built += 1
        for sub in module.modules():
            own = schema.CLASS_FIELDS.get(type(sub), {})
            unlisted |= {(type(sub).__name__, k) for k in sub.__dict__ if k not in module_own and k != "training"
                         and k not in own and k not in schema.FIELDS}
    assert built >= 0.85 * len(classes) and unlisted == set()


def _try(cls, args):
    try:
        return cls(*args)
    except Exception:
        return None


def _value_past(field):
    """A value just past the bound of `field` (by its text), or None when the field has no numeric range."""
    text = field.text
    for part in text.split(" or "):
        if " in " in part and ".." in part:
            high = part.rsplit(" in ", 1)[1].split("..")[1]
            return (int(float(high)) + 1) if "int" in part else float(high) * 2 + 1
    return None


@pytest.mark.parametrize("name", sorted(schema.FIELDS))
def test_every_bounded_entry_refuses_past_its_bound(name):
    field = schema.FIELDS[name]
    past = _value_past(field)
    if past is None:  # tensors, records, switches, names: a value of the wrong type is refused
        assert not field.ok(object()) or name == "names"
        return
    assert not field.ok(past) and not field.ok([past] * 2) and not field.ok(torch.tensor(1)) or \
        name in ("stride", "gamma")  # a tensor is legitimate there


CLASS_FIELD_NAMES = sorted(((cls, name) for cls, fields in schema.CLASS_FIELDS.items() for name in fields),
                           key=lambda pair: (pair[0].__name__, pair[1]))


@pytest.mark.parametrize("cls, name", CLASS_FIELD_NAMES, ids=lambda v: getattr(v, "__name__", v))
def test_every_class_field_refuses_past_its_bound(cls, name):
    field = schema.CLASS_FIELDS[cls][name]
    past = _value_past(field)
    if past is None:
        assert not field.ok(object())
        return
    assert not field.ok(past) and not field.ok([past] * 2) and not field.ok(torch.tensor(1))


def _demo():
    ckpt, _ = read(models.demo_checkpoint("sta"))
    return _pick_model(ckpt, "demo")[0]


@pytest.mark.parametrize("layer, field, value, says", [
    (9, "n", 25_000, "SPPF model.9.n = 25000"),  # SPPF's forward keeps n outputs
    (9, "n", torch.tensor(10**9), "SPPF model.9.n"),  # a tensor where an int is meant: range() would take it
    (10, "n_iter", 10**9, "StokenAttention model.10.n_iter"),
    (4, "c", 100_000, "C2f model.4.c"),
    (9, "type", "x" * 300, "model.9.type"),
    (4, "f", 3.5, "C2f model.4.f"),
])
def test_field_past_its_bound_is_refused_with_its_name(layer, field, value, says):
    model = _demo()
    model.model[layer].__dict__[field] = value
    with pytest.raises(Refused, match=says.replace(".", r"\.").replace("(", r"\(")):
        schema.check_model(model)


@pytest.mark.parametrize("layer, field, value, says", [
    (lambda: nn.Unfold(3), "kernel_size", 10 ** 9, "Unfold 0.kernel_size = 1000000000"),  # k*k copies of its input
    (lambda: nn.Fold((8, 8), 2), "output_size", (10 ** 6, 10 ** 6), "Fold 0.output_size"),
    (lambda: nn.MultiheadAttention(16, 4), "embed_dim", 10 ** 9, "MultiheadAttention 0.embed_dim = 1000000000"),
    (lambda: nn.MultiheadAttention(16, 4), "_qkv_same_embed_dim", "yes", "MultiheadAttention 0._qkv_same_embed_dim"),
    (lambda: nn.MultiheadAttention(16, 4), "dropout", 2.0, "MultiheadAttention 0.dropout"),
    (lambda: nn.ReflectionPad2d(1), "padding", (10 ** 6,) * 4, "ReflectionPad2d 0.padding"),
    (lambda: nn.ConstantPad3d(1, 0.0), "padding", (-(10 ** 6),) * 6, "ConstantPad3d 0.padding"),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"), "_reversed_padding_repeated_twice",
     [10 ** 6] * 4, "Conv2d 0._reversed_padding_repeated_twice"),  # what F.pad gets: the padded copy's size
    (lambda: nn.LPPool2d(2, 3), "norm_type", 1e9, "LPPool2d 0.norm_type"),
    (lambda: nn.Embedding(10, 4), "num_embeddings", 10 ** 12, "Embedding 0.num_embeddings"),
    (lambda: nn.Unflatten(1, (2, 2)), "unflattened_size", (10 ** 9, 10 ** 9), "Unflatten 0.unflattened_size"),
    (lambda: nn.Softmin(1), "dim", 100, "Softmin 0.dim = 100"),  # an axis, not channels
    (lambda: nn.LocalResponseNorm(2), "size", 10 ** 9, "LocalResponseNorm 0.size"),
    (lambda: nn.PixelUnshuffle(2), "downscale_factor", 10 ** 4, "PixelUnshuffle 0.downscale_factor"),
    (lambda: nn.ParameterList([nn.Parameter(torch.zeros(1))]), "_size", 10 ** 12, "ParameterList 0._size"),
])
def test_torch_layer_field_past_its_bound_is_refused_with_its_name(layer, field, value, says):
    model = nn.Sequential(layer())
    schema.check_model(model)  # as built: within every bound
    model[0].__dict__[field] = value
    with pytest.raises(Refused, match=re.escape(says)):
        schema.check_model(model)


def test_class_field_overrides_apply():
    softmax = torch.nn.Softmax(dim=1)
    schema._check_fields("s", softmax)  # an axis, not channels
    softmax.dim = 9
    with pytest.raises(Refused, match="Softmax s.dim"):
        schema._check_fields("s", softmax)


@pytest.mark.parametrize("f, says", [
    ([16, 19, 99], "takes input from layer 99"),  # past the model
    ([16, 19, 21], "takes input from layer 21"),  # itself
    ([16, 19, 3], "takes input from layer 3"),  # earlier but never saved: its output is None at run time
    ([16, 19, -30], "takes input from layer -30"),
])
def test_layer_inputs_must_be_earlier_saved_layers(f, says):
    model = _demo()
    model.model[-1].f = f
    with pytest.raises(Refused, match=says):
        schema.check_model(model)


def test_layer_position_and_first_layer_input():
    model = _demo()
    model.model[5].i = 6
    with pytest.raises(Refused, match="layer 5 .* says it is layer 6"):
        schema.check_model(model)
    model = _demo()
    model.model[0].f = 0
    with pytest.raises(Refused, match="layer 0"):
        schema.check_model(model)


def test_repconv_sizes_must_be_its_convolutions():
    from ultralytics.nn.modules.conv import RepConv

    block = RepConv(8, 8, bn=True)
    schema.check_model(block)
    block.c1 = 12_000  # fuse() would allocate c1 x c1/g x 3 x 3 floats: past the channel bound
    with pytest.raises(Refused, match=r"RepConv \(the model\)\.c1 = 12000"):
        schema.check_model(block)
    block.c1 = 8192  # within the bound, still 2.4 GB in fuse(): not its convolution's
    with pytest.raises(Refused, match="c1, c2 and g must be those of its conv1"):
        schema.check_model(block)


def test_tensor_bytes_count_each_view_at_its_own_size():
    model = _demo()
    storage = torch.zeros(1 << 20, dtype=torch.float16)
    model.model[4].__dict__["views"] = [storage[:] for _ in range(16)]  # 16 x 4 MiB once cast: fine
    schema.check_model(model)
    layer = model.model[4]
    for k in range(300):  # 300 x 4 MiB: each view becomes its own fp32 copy in float()
        layer._buffers[f"v{k}"] = storage[:]
    with pytest.raises(Refused, match="once cast to fp32"):
        schema.check_model(model)


@pytest.mark.parametrize("names, ok", [
    ({0: "person", 1: "行人", 2: "x" * 256}, True),
    ({i: f"c{i}" for i in range(schema.MAX_NAMES)}, True),
    ({i: f"c{i}" for i in range(schema.MAX_NAMES + 1)}, False),
    ({0: "x" * 257}, False),
    ({0: "ok\nwrote model.onnx: parity passed"}, False),
    ({0: "\x1b[2Khidden"}, False),
])
def test_names_bounds(names, ok):
    if ok:
        schema.check_names(names)
    else:
        with pytest.raises(Refused, match="class"):
            schema.check_names(names)


@pytest.mark.parametrize("value, stride, expected", [
    (640, 32, 640), (1000, 32, 1024), ([480, 640], 32, [480, 640]), ([300, 500], 64, [320, 512]), (None, 32, None),
    (4096, 32, 4096)])
def test_training_image_size_rounds_up_to_the_stride(value, stride, expected):
    assert schema.image_size(value, stride) == expected


@pytest.mark.parametrize("value", [6400, 4097, [640, 5000], [1, 2, 3], 0, -32])
def test_training_image_size_past_the_bound_is_refused(value):
    with pytest.raises(Refused, match="train_args imgsz"):
        schema.image_size(value, 32)


def test_demo_checkpoints_are_untouched_by_the_checks():
    model = _demo()
    before = copy.deepcopy(model.state_dict())
    schema.check_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
