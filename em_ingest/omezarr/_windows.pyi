# The compiled window kernel (_windows.c): types for mypy.
from typing import Any

def mean_into(block: Any, out: Any, factors: tuple[int, int, int], /) -> tuple[int, int, int]: ...
