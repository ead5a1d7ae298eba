"""How sizes read wherever the studio shows them (the runs and datasets tables, the model list, the command line,
the messages of a refused dataset): one formatter per kind of number, so every face of the studio says the same.
No torch: the web process formats with these too."""
from __future__ import annotations

from typing import Optional

BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(n: Optional[float], unit: Optional[str] = None) -> str:
    """Binary units. Without `unit`, the one that reads best: 512 → "512 B", 9_751_756 → "9.3 MiB",
    1_288_490_189 → "1.2 GiB"; None (not known) → "". With a `unit` of BINARY_UNITS, that unit, one decimal and
    thousands separators, for a limit the user compares with a setting in that unit: 4096 · 2**20, "MiB" →
    "4,096.0 MiB"."""
    if n is None:
        return ""
    if unit is not None:
        if unit not in BINARY_UNITS:
            raise ValueError(f"unit must be one of {', '.join(BINARY_UNITS)}, got {unit!r}")
        return f"{n / 1024 ** (BINARY_UNITS.index(unit) + 1):,.1f} {unit}"
    if n < 1024:
        return f"{n:.0f} B"
    for name in BINARY_UNITS:
        n /= 1024
        text = f"{n:.1f}" if n < 100 else f"{n:.0f}"
        if float(text) < 1024:  # 1023.97 KiB reads better as 1.0 MiB
            break
    return f"{text} {name}"


def format_parameters(count: Optional[int]) -> str:
    """Three significant digits, so the model list, the runs table and the CLI read alike:
    2_436_096 → "2.44M", 134_515_008 → "135M", 999 → "999"; None (not known) → ""."""
    if count is None:
        return ""
    rounded = float(f"{count:.3g}")
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if rounded >= size:
            return f"{rounded / size:.3g}{unit}"
    return str(count)
