"""What :func:`actpack.measure` returns: bytes held for backward, in total and per module and op."""

from __future__ import annotations

from dataclasses import dataclass, field

from actpack.engine.accounting import bits_per_element, compression_ratio

__all__ = ["Report"]


def _size(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps the figure at least 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _ratio(before: int, after: int) -> str:
    if not before:
        # Nothing this row holds is counted as saved (its codes are booked
        # to the row holding their storage; a row without baseline bytes
        # has no ratio).
        return "-"
    if after:
        return f"{before / after:.2f}x"
    return "inf"


def _table(title: str, rows: list[tuple[str, int, int]], top: int) -> list[str]:
    """``rows`` of (name, bytes without actpack, bytes with it), largest first, ``top`` shown."""
    rows = sorted(rows, key=lambda r: (-r[1], r[0]))
    shown, rest = rows[:top], rows[top:]
    cells = [(name, _size(b), _size(c), _ratio(b, c)) for name, b, c in shown]
    if rest:
        b, c = sum(r[1] for r in rest), sum(r[2] for r in rest)
        cells.append((f"({len(rest)} more)", _size(b), _size(c), _ratio(b, c)))
    head = (title, "saved", "compressed", "ratio")
    width = [max(len(row[i]) for row in [head, *cells]) for i in range(4)]
    lines = []
    for row in [head, *cells]:
        name = row[0].ljust(width[0])
        nums = "  ".join(cell.rjust(w) for cell, w in zip(row[1:], width[1:]))
        lines.append(f"  {name}  {nums}")
    return lines


@dataclass
class Report:
    """Bytes autograd holds for backward during one step, with and without compression.

    Byte counts are exact (each storage autograd keeps alive counted once).
    ``modules`` and ``ops`` map a module name (``"<none>"``: saved outside
    any module) and a torch op name to ``(bytes without actpack, bytes with
    it)``; ``passthrough`` maps a reason (``"tiny"``, ``"integer"``, ...) to
    the bytes kept uncompressed for it; ``forms`` maps a reason to
    ``(bytes without actpack, bytes with it)`` of saves stored in a form the
    policy picks instead of the strategy's code (``"attention query/key:
    fp16 (softmax recomputed from them)"``: fused attention's query and
    key).  ``weight_bytes``: casts of
    parameters autograd holds (autocast's bf16 weight copies), never
    compressed and not counted in the totals.  ``leaf_bytes``: tensors
    without autograd history autograd holds (the input batch, a frozen
    model's activations, a ``detach()``-ed activation), never compressed and
    not counted in the totals: each storage once among them (an activation
    coded or held for another op is counted here too: the leaf save keeps
    its memory alive).  ``peak_bytes`` and
    ``baseline_peak_bytes``: CUDA peak memory of the step with and without
    compression (``None`` elsewhere).

    ``str(report)`` is a readable summary: totals, then the modules and ops
    holding the most bytes, then what is stored in another form than the
    strategy's code, and what passed through, and why.
    """

    strategy: str
    baseline_bytes: int
    compressed_bytes: int
    tensors: int
    baseline_elements: int = 0
    weight_bytes: int = 0
    leaf_bytes: int = 0
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    ops: dict[str, tuple[int, int]] = field(default_factory=dict)
    passthrough: dict[str, int] = field(default_factory=dict)
    forms: dict[str, tuple[int, int]] = field(default_factory=dict)
    peak_bytes: int | None = None
    baseline_peak_bytes: int | None = None

    @property
    def ratio(self) -> float:
        """``baseline_bytes / compressed_bytes`` (``inf`` when nothing is held)."""
        return compression_ratio(self.baseline_bytes, self.compressed_bytes)

    @property
    def bits_per_element(self) -> float:
        """Compressed bits per element autograd would have held."""
        return bits_per_element(self.compressed_bytes, self.baseline_elements)

    def format(self, top: int = 10) -> str:
        """The summary ``str(report)`` prints, with the ``top`` largest modules and ops."""
        lines = [
            f"{self.strategy}: {_size(self.baseline_bytes)} -> {_size(self.compressed_bytes)} "
            f"saved for backward ({_ratio(self.baseline_bytes, self.compressed_bytes)}, "
            f"{self.bits_per_element:.2f} bits/element, {self.tensors} "
            f"tensor{'' if self.tensors == 1 else 's'})"
        ]
        if self.peak_bytes is not None and self.baseline_peak_bytes is not None:
            lines.append(
                f"peak memory of the step: {_size(self.baseline_peak_bytes)} -> "
                f"{_size(self.peak_bytes)}"
            )
        if self.weight_bytes:
            lines.append(
                f"model weights' views and casts held for backward (never compressed, "
                f"not counted above): "
                f"{_size(self.weight_bytes)}"
            )
        if self.leaf_bytes:
            lines.append(
                f"leaf tensors held for backward (input batch, detached or frozen "
                f"activations; never compressed, not counted above): {_size(self.leaf_bytes)}"
            )
        for title, table in (("module", self.modules), ("op", self.ops)):
            rows = [(name, b, c) for name, (b, c) in table.items()]
            if rows:
                lines += ["", f"largest {title}s by bytes saved for backward:"]
                lines += _table(title, rows, top)
        if self.forms:
            lines += ["", "stored in another form than the strategy's code:"]
            width = max(len(reason) for reason in self.forms)
            for reason, (b, c) in sorted(self.forms.items(), key=lambda kv: (-kv[1][1], kv[0])):
                lines.append(f"  {reason.ljust(width)}  {_size(b).rjust(10)} -> {_size(c)}")
        if self.passthrough:
            total = sum(self.passthrough.values())
            lines += ["", f"passed through uncompressed: {_size(total)}"]
            width = max(len(reason) for reason in self.passthrough)
            for reason, n in sorted(self.passthrough.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {reason.ljust(width)}  {_size(n).rjust(10)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
