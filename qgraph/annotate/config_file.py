"""The ``--config`` file: per-tensor quantization overrides in TOML.

::

    exclude = ["attention_scores", "Softmax"]     # node names or operator types kept in FP32
    keep_fp32 = ["first"]                          # "first" and/or "last" compute layer

    [activation."stem_relu_out"]                   # a quantized activation tensor
    dtype = "uint16"                               # uint8 | int8 | uint16 | int16
    symmetric = false
    method = "percentile"                          # minmax | ema | entropy | percentile | mse

    [weight."fc.weight"]                           # a quantized weight initializer
    bits = 8                                       # 8 | 4
    per_channel = false
    symmetric = true

    [quantization]                                 # whole-model settings (what a tuning recipe records)
    method = "entropy"                             # the calibration method of every activation
    per_channel = true                             # weights per output channel (false: per tensor)
    min_sqnr = "off"                               # the automatic fallback's bound in dB, or "off"
    smooth_quant = 0.5                             # SmoothQuant alpha in [0, 1], or "off"
    bias_correction = "on"                         # auto | on | off
    activations = "static"                         # static | dynamic | auto

Unset fields keep the target's choice (the ``[quantization]`` settings override the command line's). Every name
must be a tensor that the target quantizes; a name that is not (misspelt, or kept in FP32) is refused after
annotation with the list of what can be named. An integer kernel that cannot take an overridden format leaves that
island in QDQ form rather than failing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from qgraph.annotate.annotator import AnnotationOverrides
from qgraph.errors import QGraphError
from qgraph.quant.spec import QuantSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

METHODS = ("minmax", "ema", "entropy", "percentile", "mse")
_DTYPES = {"uint8": (8, False), "int8": (8, True), "uint16": (16, False), "int16": (16, True)}
_TOP_LEVEL = {"exclude", "keep_fp32", "activation", "weight", "quantization"}
_QUANTIZATION_KEYS = {"method", "per_channel", "min_sqnr", "smooth_quant", "bias_correction", "activations"}
_QUANTIZATION_CHOICES = {"bias_correction": ("auto", "on", "off"), "activations": ("static", "dynamic", "auto")}
_ACTIVATION_KEYS = {"dtype", "symmetric", "method"}
_WEIGHT_KEYS = {"bits", "per_channel", "symmetric"}


class ConfigError(QGraphError):
    """The --config file is unreadable or says something qgraph cannot do."""


def _table(data: dict, key: str, path: Path) -> dict[str, dict]:
    table = data.get(key, {})
    if not isinstance(table, dict) or not all(isinstance(value, dict) for value in table.values()):
        raise ConfigError(f'{path}: [{key}."NAME"] entries must be tables of settings')
    return table


def _check_keys(entry: dict, allowed: set[str], where: str, path: Path) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown setting {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _string_list(data: dict, key: str, path: Path) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{path}: {key} must be a list of strings")
    return value


def _activation_spec(entry: dict, base: QuantSpec, where: str, path: Path) -> QuantSpec:
    spec = base
    if "dtype" in entry:
        if entry["dtype"] not in _DTYPES:
            raise ConfigError(f"{path}: {where}: dtype must be one of {', '.join(_DTYPES)}, got {entry['dtype']!r}")
        bits, signed = _DTYPES[entry["dtype"]]
        spec = dataclasses.replace(spec, bits=bits, signed=signed, symmetric=signed, reduce_range=False)
    if "symmetric" in entry:
        if not isinstance(entry["symmetric"], bool):
            raise ConfigError(f"{path}: {where}: symmetric must be true or false")
        spec = dataclasses.replace(spec, symmetric=entry["symmetric"])
    return spec


def _weight_spec(entry: dict, base: QuantSpec, where: str, path: Path) -> QuantSpec:
    spec = base.with_axis(0)  # per channel unless the entry says otherwise; the real axis comes from the plan
    if "bits" in entry:
        if entry["bits"] not in (4, 8):
            raise ConfigError(f"{path}: {where}: bits must be 4 or 8, got {entry['bits']!r}")
        spec = dataclasses.replace(spec, bits=entry["bits"], reduce_range=spec.reduce_range and entry["bits"] == 8)
    if "per_channel" in entry:
        if not isinstance(entry["per_channel"], bool):
            raise ConfigError(f"{path}: {where}: per_channel must be true or false")
        spec = spec.with_axis(0 if entry["per_channel"] else None)
    if "symmetric" in entry:
        if not isinstance(entry["symmetric"], bool):
            raise ConfigError(f"{path}: {where}: symmetric must be true or false")
        spec = dataclasses.replace(spec, symmetric=entry["symmetric"])
    return spec


def load_quantization_settings(path: str | Path) -> dict[str, object]:
    """The ``[quantization]`` table of the config file at ``path``, checked: ``method`` (a calibration method),
    ``per_channel`` (bool), ``min_sqnr`` (None for ``"off"``, else a bound in dB), ``smooth_quant`` (None for
    ``"off"``, else alpha), ``bias_correction`` and ``activations`` (their modes)."""
    path = Path(path)
    data = _read(path)
    settings = data.get("quantization", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: [quantization] must be a table of settings")
    _check_keys(settings, _QUANTIZATION_KEYS, "[quantization]", path)
    checked: dict[str, object] = {}
    if "method" in settings:
        if settings["method"] not in METHODS:
            raise ConfigError(f"{path}: [quantization]: method must be one of {', '.join(METHODS)}")
        checked["method"] = settings["method"]
    if "per_channel" in settings:
        if not isinstance(settings["per_channel"], bool):
            raise ConfigError(f"{path}: [quantization]: per_channel must be true or false")
        checked["per_channel"] = settings["per_channel"]
    if "min_sqnr" in settings:
        bound = settings["min_sqnr"]
        if bound == "off":
            checked["min_sqnr"] = None
        elif isinstance(bound, (int, float)) and not isinstance(bound, bool) and 0 < bound <= 100:
            checked["min_sqnr"] = float(bound)
        else:
            raise ConfigError(f'{path}: [quantization]: min_sqnr must be a bound in (0, 100] dB or "off"')
    if "smooth_quant" in settings:
        alpha = settings["smooth_quant"]
        if alpha == "off":
            checked["smooth_quant"] = None
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1:
            checked["smooth_quant"] = float(alpha)
        else:
            raise ConfigError(f'{path}: [quantization]: smooth_quant must be an alpha in [0, 1] or "off"')
    for key, choices in _QUANTIZATION_CHOICES.items():
        if key in settings:
            if settings[key] not in choices:
                raise ConfigError(f"{path}: [quantization]: {key} must be one of {', '.join(choices)}")
            checked[key] = settings[key]
    return checked


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


def load_overrides(
    path: str | Path, *, base: AnnotationOverrides, activation_spec: QuantSpec, weight_spec: QuantSpec
) -> AnnotationOverrides:
    """``base`` extended by the overrides in the TOML file at ``path`` (weight specs: axis None = per tensor)."""
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{path}: unknown section or key {unknown[0]!r}; allowed: {', '.join(sorted(_TOP_LEVEL))}")
    keep = _string_list(data, "keep_fp32", path)
    if set(keep) - {"first", "last"}:
        raise ConfigError(f"{path}: keep_fp32 takes \"first\" and/or \"last\", got {keep!r}")
    activation_specs = dict(base.activation_overrides)
    methods = dict(base.activation_methods)
    for name, entry in _table(data, "activation", path).items():
        where = f'[activation."{name}"]'
        _check_keys(entry, _ACTIVATION_KEYS, where, path)
        activation_specs[name] = _activation_spec(entry, activation_spec, where, path)
        if "method" in entry:
            if entry["method"] not in METHODS:
                raise ConfigError(f"{path}: {where}: method must be one of {', '.join(METHODS)}")
            methods[name] = entry["method"]
    weight_specs = dict(base.weight_overrides)
    for name, entry in _table(data, "weight", path).items():
        where = f'[weight."{name}"]'
        _check_keys(entry, _WEIGHT_KEYS, where, path)
        weight_specs[name] = _weight_spec(entry, weight_spec, where, path)
    return dataclasses.replace(
        base,
        exclude=base.exclude | frozenset(_string_list(data, "exclude", path)),
        keep_first_fp32=base.keep_first_fp32 or "first" in keep,
        keep_last_fp32=base.keep_last_fp32 or "last" in keep,
        activation_overrides=activation_specs,
        weight_overrides=weight_specs,
        activation_methods=methods,
    )


def check_override_names(plan) -> None:
    """Refuse overrides that name no quantized tensor of ``plan`` (misspelt, or kept in FP32)."""
    weights = {weight.name for weight in plan.weights}
    for kind, names, known in (
        ("activation", set(plan.activation_overrides) | set(plan.activation_methods), set(plan.activations)),
        ("weight", set(plan.weight_overrides), weights),
    ):
        missing = sorted(names - known)
        if missing:
            sample = ", ".join(sorted(known)[:8]) + (" …" if len(known) > 8 else "")
            raise ConfigError(f"--config: {kind} {missing[0]!r} is not a quantized {kind} of the model (e.g. {sample})")
