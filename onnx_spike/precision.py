"""Precision parameters of the spiking operators, per operator kind, and the named presets.

Two presets ship:

- ``default``: 16 fractional bits on the Softmax and norm outputs, 12 on SiLU/GELU, rounding
  and a 1024-segment exponential table on [-16, 0]. Softmax and the norms divide by the
  row-shared reciprocal, SiLU/GELU by the exact bit-serial neuron (15 bits of sigma). A
  near-uniform Softmax over 1024 positions has probabilities of about 2^-10, which a 16-bit
  grid still resolves to 1 part in 64, and rounding keeps the grid error unbiased, so the row
  mass stays within 1% of 1 (the 8-bit grid of the paper floors every such entry to 0). The
  wider exponential range H = 8 makes the clip term e^(-2H) about 1e-7 per entry, small next
  to the grid even when hundreds of keys sit far below the row max.
- ``paper``: the settings of Yuan et al., "Plug-and-Play Spiking Operators" (ICML 2026): an
  8-bit output grid with flooring, K = 64 segments on [-5, 5], 8 CORDIC iterations, and the
  population division group (T = 2 steps of L = 128 neurons, so T * L = 256; SiLU's 12-bit
  sigma uses T = 2, L = 2048). The paper fixes only the product T * L, which alone sets the
  result; fewer steps of larger groups need fewer comparisons (T * (log2 L + 1)).

Every field is checked when the spec is built, so an invalid value fails before any graph
work with the name of the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Fractional bits of an int64 product path must leave room for the sign: 2 * 30 + 3 < 63.
MAX_RECIPROCAL_BITS = 30


class PrecisionError(ValueError):
    """An invalid precision parameter; the message names the field and the allowed values."""


def _check_range(owner: str, name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PrecisionError(f"{owner}.{name} must be an integer in [{low}, {high}], got {value!r}")


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class ExpSpec:
    """Piecewise-linear e^t on t in [-2H, 0], stored as chord knots and slopes.

    The table is the paper's e^x on [-H, H] shifted by -H, scaled so that e^0 maps to
    2^value_bits: the row max of a Softmax lands exactly on the top knot.
    """

    half_range: float = 8.0  # H: the table spans [-2H, 0]
    segments: int = 1024  # K
    value_bits: int = 20  # P: knot values are round(e^t * 2^P), so e^0 = 2^P
    slope_frac_bits: int = 8  # extra fractional bits of each slope beyond one input unit

    def validate(self, owner: str) -> None:
        if not (0.5 <= self.half_range <= 32.0):
            raise PrecisionError(f"{owner}.half_range must be in [0.5, 32], got {self.half_range!r}")
        _check_range(owner, "segments", self.segments, 2, 1 << 16)
        _check_range(owner, "value_bits", self.value_bits, 8, 30)
        _check_range(owner, "slope_frac_bits", self.slope_frac_bits, 0, 16)

    def segment_width_units(self, input_frac_bits: int) -> int:
        """Knot spacing 2H/K in input units of 2^-input_frac_bits; must be an integer."""
        width = 2.0 * self.half_range / self.segments * (1 << input_frac_bits)
        if width < 1 or width != int(width):
            raise PrecisionError(
                f"exp table: knot spacing 2H/K = {2 * self.half_range / self.segments!r} is not a "
                f"positive multiple of the input grid 2^-{input_frac_bits}; choose H and K so that "
                f"2H * 2^{input_frac_bits} / K is a whole number")
        return int(width)


@dataclass(frozen=True)
class DivisionSpec:
    """How A / B is computed by neurons.

    - ``bitserial``: one IF neuron per quotient whose membrane starts at A and doubles each
      step. It spikes at B with a soft reset, and its spikes are the bits of the exact
      floor(A * 2^n / B) after n + 1 steps (n + 2 with rounding). It suits per-element
      division (SiLU, GELU), where no denominator is shared.
    - ``reciprocal``: the denominator is normalised to reciprocal_bits + 1 bits by a shift
      shared with the numerator, one bit-serial IF neuron per denominator computes
      floor(2^(2m+1) / B) in m + 2 steps, and each numerator is scaled by that spike count.
      The per-denominator work is done once per row for Softmax and the norms.
    - ``population``: the paper's group: threshold theta = B >> n after a shared pre-scale,
      T steps of L neurons with thresholds theta .. L*theta, output min(T*L, floor(A/theta)).
    """

    method: str = "reciprocal"
    reciprocal_bits: int = 24  # m, only for "reciprocal"
    time_steps: int = 16  # T, only for "population"
    neurons: int = 16  # L, only for "population"
    theta_guard_bits: int = 8  # pre-scale B so theta = B >> n keeps n + guard bits

    def validate(self, owner: str, frac_bits: int) -> None:
        if self.method not in ("bitserial", "reciprocal", "population"):
            raise PrecisionError(
                f"{owner}.method must be 'bitserial', 'reciprocal' or 'population', got {self.method!r}")
        if self.method == "bitserial":
            return
        if self.method == "reciprocal":
            _check_range(owner, "reciprocal_bits", self.reciprocal_bits, frac_bits, MAX_RECIPROCAL_BITS)
        else:
            for name in ("time_steps", "neurons"):
                value = getattr(self, name)
                if not isinstance(value, int) or not _is_power_of_two(value) or value > 1 << 16:
                    raise PrecisionError(f"{owner}.{name} must be a power of two in [1, 65536], got {value!r}")
            if self.time_steps * self.neurons != 1 << frac_bits:
                raise PrecisionError(
                    f"{owner}: time_steps * neurons must equal 2^frac_bits = {1 << frac_bits} for the "
                    f"population division, got {self.time_steps} * {self.neurons}")
            _check_range(owner, "theta_guard_bits", self.theta_guard_bits, 0, 16)


@dataclass(frozen=True)
class SoftmaxSpec:
    input_frac_bits: int = 16  # encode scale 2^f of the logits; int64 currents
    frac_bits: int = 16  # n: output grid 2^-n
    rounding: bool = True  # round to nearest on the output grid (False: floor, as the paper)
    exp: ExpSpec = field(default_factory=ExpSpec)
    division: DivisionSpec = field(default_factory=DivisionSpec)

    def validate(self) -> None:
        _check_range("softmax", "input_frac_bits", self.input_frac_bits, 0, 24)
        _check_range("softmax", "frac_bits", self.frac_bits, 2, 24)
        self.exp.validate("softmax.exp")
        self.exp.segment_width_units(self.input_frac_bits)
        if self.frac_bits > self.exp.value_bits + 4:
            raise PrecisionError("softmax.frac_bits may exceed softmax.exp.value_bits by at most 4")
        self.division.validate("softmax.division", self.frac_bits)


@dataclass(frozen=True)
class SiluSpec:
    input_frac_bits: int = 16  # int32 currents: |x| saturates at 2^(31 - f)
    frac_bits: int = 12  # output grid
    # Grid of the intermediate sigma before the product with x. 15 bits keep the max SiLU error
    # on [-8, 8] at 2.4e-4 (16 bits: 1.8e-4, 14 bits: 3.7e-4), and each bit costs one neuron step.
    sigmoid_frac_bits: int = 15
    rounding: bool = True
    # "symmetric": sigma(-|x|) = e^-|x| / (1 + e^-|x|) on a table over [-2H, 0], no clip at -H.
    # "paper": sigma(x) = 1 / (1 + e^-x) with e^-x from [-H, H] and output 0 below -H.
    form: str = "symmetric"
    exp: ExpSpec = field(default_factory=ExpSpec)
    division: DivisionSpec = field(default_factory=lambda: DivisionSpec(method="bitserial"))

    def validate(self, owner: str = "silu") -> None:
        _check_range(owner, "input_frac_bits", self.input_frac_bits, 4, 24)
        _check_range(owner, "frac_bits", self.frac_bits, 2, 24)
        _check_range(owner, "sigmoid_frac_bits", self.sigmoid_frac_bits, self.frac_bits, 24)
        if self.form not in ("symmetric", "paper"):
            raise PrecisionError(f"{owner}.form must be 'symmetric' or 'paper', got {self.form!r}")
        self.exp.validate(f"{owner}.exp")
        self.exp.segment_width_units(self.input_frac_bits)
        self.division.validate(f"{owner}.division", self.sigmoid_frac_bits)


@dataclass(frozen=True)
class NormSpec:
    input_frac_bits: int = 24  # int64 currents saturating at 2^40 units
    frac_bits: int = 16  # output grid of x / rms (before the float weight)
    rounding: bool = True
    cordic_iterations: int = 12
    quotient_guard_bits: int = 2  # extra bits of |x| / ||v|| beyond n + ceil(log2 sqrt(d))
    division: DivisionSpec = field(default_factory=lambda: DivisionSpec(reciprocal_bits=27))

    def validate(self) -> None:
        _check_range("norm", "input_frac_bits", self.input_frac_bits, 0, 32)
        _check_range("norm", "frac_bits", self.frac_bits, 2, 22)
        _check_range("norm", "cordic_iterations", self.cordic_iterations, 1, 24)
        _check_range("norm", "quotient_guard_bits", self.quotient_guard_bits, 0, 8)
        if self.division.method == "reciprocal":
            _check_range("norm.division", "reciprocal_bits", self.division.reciprocal_bits,
                         self.frac_bits, MAX_RECIPROCAL_BITS)
        else:
            self.division.validate("norm.division", self.frac_bits)


@dataclass(frozen=True)
class GeluSpec(SiluSpec):
    """GELU as x * sigma(1.5958 * (x + 0.044715 x^3)), the tanh form, on the SiLU machinery."""

    input_frac_bits: int = 16
    frac_bits: int = 14

    def validate(self, owner: str = "gelu") -> None:
        super().validate(owner)
        if self.form != "symmetric":
            raise PrecisionError("gelu.form must be 'symmetric'")


@dataclass(frozen=True)
class Precision:
    softmax: SoftmaxSpec = field(default_factory=SoftmaxSpec)
    silu: SiluSpec = field(default_factory=SiluSpec)
    norm: NormSpec = field(default_factory=NormSpec)
    gelu: GeluSpec = field(default_factory=GeluSpec)

    def validate(self) -> "Precision":
        self.softmax.validate()
        self.silu.validate()
        self.norm.validate()
        self.gelu.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Precision":
        """Build and validate a precision from nested dicts; unknown or mistyped fields raise PrecisionError."""
        sections = {"softmax": SoftmaxSpec, "silu": SiluSpec, "norm": NormSpec, "gelu": GeluSpec}
        values = _checked_fields("precision", data, sections)
        return cls(**{name: _build_spec(name, spec_type, values.get(name, {}))
                      for name, spec_type in sections.items()}).validate()


def _checked_fields(owner: str, values, fields: dict[str, type]) -> dict:
    if not isinstance(values, dict):
        raise PrecisionError(f"{owner} must be a JSON object, got {type(values).__name__} {values!r}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PrecisionError(f"{owner}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    for name, value in values.items():
        expected = fields[name]
        if dataclasses.is_dataclass(expected) or expected is object:
            continue
        if expected is bool:
            valid = isinstance(value, bool)
        elif expected is float:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            valid = isinstance(value, expected) and not isinstance(value, bool)
        if not valid:
            raise PrecisionError(f"{owner}.{name} must be of type {expected.__name__}, got {value!r}")
    return values


def _build_spec(owner: str, spec_type, values):
    types = {"bool": bool, "int": int, "float": float, "str": str, "ExpSpec": ExpSpec, "DivisionSpec": DivisionSpec}
    # Field annotations are strings (postponed evaluation). A field of another type is not type-checked.
    fields = {item.name: types.get(item.type, object) for item in dataclasses.fields(spec_type)}
    values = dict(_checked_fields(owner, values, fields))
    for name, value in values.items():
        if dataclasses.is_dataclass(fields[name]):
            values[name] = _build_spec(f"{owner}.{name}", fields[name], value)
    return spec_type(**values)


# Slopes and knots share one 24-bit scale: e^-2H * 2^24 still has about 9 bits at H = 5, so
# the table reaches the chord bound over its whole range (8-bit slopes and 16-bit knots, as
# quoted by the paper, cannot on a common scale).
_PAPER_EXP = ExpSpec(half_range=5.0, segments=64, value_bits=24)
# The paper fixes only T * L = 2^n; fewer, wider steps need fewer comparisons per quotient.
_PAPER_DIVISION = DivisionSpec(method="population", time_steps=2, neurons=128, theta_guard_bits=8)

PRESETS: dict[str, Precision] = {
    "default": Precision(),
    "paper": Precision(
        softmax=SoftmaxSpec(frac_bits=8, rounding=False, exp=_PAPER_EXP, division=_PAPER_DIVISION),
        silu=SiluSpec(frac_bits=8, sigmoid_frac_bits=12, rounding=False, form="paper", exp=_PAPER_EXP,
                      division=DivisionSpec(method="population", time_steps=2, neurons=2048)),
        norm=NormSpec(frac_bits=8, rounding=False, cordic_iterations=8, division=_PAPER_DIVISION),
        gelu=GeluSpec(),
    ),
}


def preset(name: str) -> Precision:
    """Return the named preset, validated."""
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise PrecisionError(f"unknown precision preset {name!r}; choose one of {sorted(PRESETS)}") from None


def with_frac_bits(precision: Precision, kind: str, frac_bits: int) -> Precision:
    """Return `precision` with the output grid of one operator kind set to 2^-frac_bits.

    The reciprocal and intermediate widths grow with it so that they stay valid.
    """
    spec = getattr(precision, kind)
    changes: dict = {"frac_bits": frac_bits}
    if isinstance(spec, SiluSpec):
        sigma = max(spec.sigmoid_frac_bits, frac_bits + 6)
        changes["sigmoid_frac_bits"] = min(sigma, 24)
        if spec.division.method == "reciprocal":
            changes["division"] = dataclasses.replace(spec.division, reciprocal_bits=min(sigma, 24))
        elif spec.division.method == "population":
            steps = max(1, (1 << min(sigma, 24)) // spec.division.neurons)
            changes["division"] = dataclasses.replace(spec.division, time_steps=steps,
                                                      neurons=(1 << min(sigma, 24)) // steps)
    elif spec.division.method == "bitserial":
        pass
    elif spec.division.method == "reciprocal":
        changes["division"] = dataclasses.replace(
            spec.division, reciprocal_bits=min(max(spec.division.reciprocal_bits, frac_bits + 8), MAX_RECIPROCAL_BITS))
    else:
        steps = max(1, (1 << frac_bits) // spec.division.neurons)
        neurons = (1 << frac_bits) // steps
        changes["division"] = dataclasses.replace(spec.division, time_steps=steps, neurons=neurons)
    return dataclasses.replace(precision, **{kind: dataclasses.replace(spec, **changes)}).validate()
