"""What a merge request is made of, as plain data: output dtypes, the declared method parameters, the seed.

The CLI's choices and the HTTP API's schema are built from here and from the method registry
(`merge.methods.METHODS`); `describe()` returns all of it as JSON-ready data. numpy-free, so
`loramill --help` reads it without loading the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.errors import InputError

OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # --dtype name -> safetensors code
DTYPE_CHOICES = ("auto", *OUTPUT_DTYPES)  # "auto": every tensor keeps its dtype


@dataclass(frozen=True)
class Parameter:
    """One option a merge takes: its name (`drop_rate` is `--drop-rate` on the CLI), type, default and range.

    `default=None` means the option is required. Bounds are inclusive unless marked exclusive.
    """

    name: str
    type: type  # int or float
    help: str
    default: int | float | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> int | float:
        """`value` as this parameter's type, or `InputError` naming the flag and the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (self.type is int and not float(value).is_integer()):
            raise InputError(f"{self.flag} must be {'an integer' if self.type is int else 'a number'}, got {value!r}",
                             param=self.name)
        value = self.type(value)
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        high_ok = self.maximum is None or (value < self.maximum if self.exclusive_maximum else value <= self.maximum)
        if not (low_ok and high_ok and value == value):  # value == value: not NaN
            raise InputError(f"{self.flag} must be {self.range_text()}, got {value}", param=self.name)
        return value

    def range_text(self) -> str:
        """`in (0, 1]`, `at least 1`, ... as the error messages say it."""
        if self.minimum is not None and self.maximum is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{self.minimum}, "
                    f"{self.maximum}{')' if self.exclusive_maximum else ']'}")
        if self.minimum is not None:
            return f"{'above' if self.exclusive_minimum else 'at least'} {self.minimum}"
        return f"{'below' if self.exclusive_maximum else 'at most'} {self.maximum}"

    def describe(self) -> dict:
        """JSON Schema keywords for this parameter (`type`, `default`, bounds, `description`)."""
        schema: dict = {"type": "integer" if self.type is int else "number", "description": self.help}
        if self.default is not None:
            schema["default"] = self.default
        if self.minimum is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            schema["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        return schema


# The seed is an option of the whole merge (as mergekit's --random-seed), used by the methods that draw.
SEED = Parameter("seed", int, "seed of the random draws (the same seed, the same merge)", default=0,
                 minimum=0, maximum=2**31 - 1)


def describe() -> dict:
    """Everything a merge request can say, for an API schema:

        {"methods": {name: {"parameters": {name: schema}, "required": [...], "writes_adapter", "exact",
                            "elementwise", "uses_seed", "description"}},
         "default_method": "linear", "dtypes": ["auto", ...], "default_dtype": "auto", "seed": schema}
    """
    from merge.methods import DEFAULT_METHOD, METHODS

    return {"methods": {name: method.describe_class() for name, method in METHODS.items()},
            "default_method": DEFAULT_METHOD, "dtypes": list(DTYPE_CHOICES), "default_dtype": "auto",
            "seed": SEED.describe()}
