"""The config's comma-list fields parsed one way everywhere (no JAX): 'a, b' -> ['a', 'b'].

Empty items are dropped ('' -> []); a non-number in `ints` or `floats` raises ValueError (the config
checks name the field before any stage runs).
"""


def names(text) -> list[str]:
  return [v.strip() for v in str(text).split(',') if v.strip()]


def ints(text) -> tuple[int, ...]:
  return tuple(int(v) for v in names(text))


def floats(text) -> tuple[float, ...]:
  return tuple(float(v) for v in names(text))
