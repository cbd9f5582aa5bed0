"""Strings that come from a checkpoint, made safe to show: on the console, in the report, in ONNX metadata.

A class path or a class name in a hostile pickle can hold a newline or an ANSI escape; printed as is, it
forges console lines ("wrote ...: parity passed") or hides the real message. Everything such a string
reaches goes through `shown`: non-printable characters as `\\x..` / `\\u....` escapes, and a length cap.
"""

MAX_SHOWN = 200


def shown(text, cap=MAX_SHOWN):
    """`text` with every non-printable character escaped, cut to `cap` characters (marked with '...')."""
    text = str(text)
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:cap + 1])
    return escaped if len(text) <= cap and len(escaped) <= cap else escaped[:cap] + "..."

