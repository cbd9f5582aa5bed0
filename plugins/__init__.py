"""Custom ONNX ops for the awkward parts of STA and S2, each backed by a model-local ONNX function.

With --plugins the exporter emits S2Shift / StokenUnfold / StokenFold as single nodes in the
`yolo_attn` domain and attaches each op's plain-op decomposition as a local function. ONNX Runtime
and TensorRT's parser inline the function; TensorRT >= 10.7 with our plugin registered runs the plugin
instead (a registered plugin of the node's name and namespace takes precedence). One file, every backend.
"""

from plugins import s2_shift, sta_fold
from plugins.body import DOMAIN

PLUGIN_TWINS = {**s2_shift.PLUGIN_TWINS, **sta_fold.PLUGIN_TWINS}


def apply(model):
    """Swap export twins in `model` (in place) for their plugin-emitting variants; returns how many."""
    swapped = 0
    for module in model.modules():
        plugin_cls = PLUGIN_TWINS.get(type(module))
        if plugin_cls is not None:
            module.__class__ = plugin_cls
            swapped += 1
    return swapped


def functions():
    return [s2_shift.function(), sta_fold.unfold_function(), sta_fold.fold_function()]


def attach_functions(proto):
    """Add the local functions for the custom ops `proto` uses, and the domain's opset import."""
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    present = {f.name for f in proto.functions}
    proto.functions.extend(f for f in functions() if f.name in used and f.name not in present)
    if used and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=DOMAIN, version=1)
    return proto


def inline_for_parser(proto):
    """`proto` with every yolo_attn call replaced by its function body, each body node named after its call site
    (`/model/model.10/StokenUnfold/Slice_13`). For a TensorRT parser with no plugin registered: it inlines the
    functions itself but names body nodes after the body's own values, identical at every call (duplicate-name
    warnings, untraceable layers). Each call gets its own copy of the body as an overload, which onnx's inliner
    expands per call."""
    import copy

    from onnx.inliner import inline_local_functions

    if not proto.functions:
        return proto
    proto = copy.deepcopy(proto)
    bodies = {(f.domain, f.name): f for f in proto.functions}
    per_call = []
    for node in proto.graph.node:
        body = bodies.get((node.domain, node.op_type))
        if body is None:
            continue
        site = node.name or node.output[0]
        call = copy.deepcopy(body)
        call.overload = node.overload = site
        for i, inner in enumerate(call.node):
            inner.name = f"{site}/{inner.op_type}_{i}"
        per_call.append(call)
    del proto.functions[:]
    proto.functions.extend(per_call)
    return inline_local_functions(proto)


def register_tensorrt():
    """Register the TensorRT plugins (tensorrt.plugin) when full TensorRT >= 10.7 is importable; else a reason."""
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError as e:
        return f"TensorRT plugins not registered ({e}); the builder inlines the ops' ONNX functions instead"
    from plugins.s2_shift import trt as s2_trt  # noqa: F401  registration happens at import
    from plugins.sta_fold import trt as sta_trt  # noqa: F401

    return None
