"""The CLI builds the same options as the Python API for the same request: flags left out keep
the library's defaults (the presets, ExportOptions' fields) instead of the CLI's own copies."""

from __future__ import annotations

import argparse

import pytest

from llmopt.cli import cmd_export, cmd_quantize
from llmopt.cli.main import build_parser
from llmopt.exporter import ExportOptions
from llmopt.quantizer import QuantizeOptions
from llmopt.quantizer.options import METHODS


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(("flags", "default", "expected"), [
    ([], QuantizeOptions.int8(), QuantizeOptions.int8()),
    ([], QuantizeOptions.int8_encoder(), QuantizeOptions.int8_encoder()),
    (["--method", "int8"], QuantizeOptions.int8_encoder(), QuantizeOptions.int8()),
    (["--method", "int4"], QuantizeOptions.int8(), QuantizeOptions.int4()),
    (["--method", "int4", "--block-size", "64", "--symmetric", "--algorithm", "rtn"],
     QuantizeOptions.int8(), QuantizeOptions.int4(block_size=64, symmetric=True,
                                                  algorithm="rtn")),
    (["--method", "int4", "--lm-head", "float"], QuantizeOptions.int8(),
     QuantizeOptions.int4(lm_head_bits=None)),
    (["--method", "int8", "--no-symmetric", "--no-eval"], QuantizeOptions.int8(),
     QuantizeOptions.int8().with_(symmetric=False, evaluate=False)),
    (["--method", "int8-dynamic", "--per-channel"], QuantizeOptions.int8(),
     QuantizeOptions.int8_dynamic(per_channel=True)),
    (["--method", "int8-dynamic", "--keep-float", "embed", "--keep-float", "layers.0."],
     QuantizeOptions.int8(), QuantizeOptions.int8_dynamic(keep_float=("embed", "layers.0."))),
    (["--method", "int8-static", "--calibration", "entropy", "--samples", "8"],
     QuantizeOptions.int8(), QuantizeOptions.int8_static(calibration="entropy", samples=8)),
    (["--method", "int8-per-token", "--smooth-alpha", "0.3"], QuantizeOptions.int8(),
     QuantizeOptions.int8_encoder(smooth_alpha=0.3)),
    (["--accuracy-level", "0", "--sequence-length", "64", "--quantize-embeddings"],
     QuantizeOptions.int4(), QuantizeOptions.int4().with_(
         accuracy_level=0, calibration_length=64, quantize_embeddings=True)),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_quantize_flags_override_the_preset(flags: list[str], default: QuantizeOptions,
                                            expected: QuantizeOptions) -> None:
    args = _args("quantize", "pkg", "-o", "out", *flags)
    assert cmd_quantize.options_from(args, default) == expected


@pytest.mark.parametrize("method", METHODS)
def test_every_quantize_method_has_a_preset(method: str) -> None:
    args = _args("quantize", "pkg", "-o", "out", "--method", method.replace("_", "-"))
    assert cmd_quantize.options_from(args, QuantizeOptions.int8()) == \
        QuantizeOptions.preset(method)
    assert QuantizeOptions.preset(method).method == method


@pytest.mark.parametrize("command", [("quantize", "pkg"), ("export", "src")])
def test_flags_have_no_defaults_of_their_own(command: tuple[str, str]) -> None:
    """Every flag left out parses to None: the library's defaults decide."""
    given = vars(_args(*command, "-o", "out"))
    own = {k: v for k, v in given.items()
           if v is not None and k not in ("command", "package", "source", "output", "verbose",
                                          "quiet")}
    assert own == {}


@pytest.mark.parametrize(("flags", "expected"), [
    ([], ExportOptions()),
    (["--dtype", "float16", "--builder", "traced"], ExportOptions(dtype="float16",
                                                                  builder="traced")),
    (["--task", "feature-extraction", "--no-validate", "--tolerance", "0.01"],
     ExportOptions(task="feature-extraction", validate=False, tolerance=0.01)),
    (["--trust-remote-code", "--allow-pickle", "--revision", "v1", "--no-external-data",
      "--generation-tokens", "4"],
     ExportOptions(trust_remote_code=True, allow_pickle=True, revision="v1",
                   external_data=False, generation_tokens=4)),
], ids=lambda value: " ".join(value) or "no flags" if isinstance(value, list) else None)
def test_export_flags_override_the_defaults(flags: list[str], expected: ExportOptions) -> None:
    assert cmd_export.options_from(_args("export", "src", "-o", "out", *flags)) == expected


def test_a_bad_flag_value_is_the_options_error() -> None:
    from llmopt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="block size 7"):
        cmd_quantize.options_from(_args("quantize", "p", "-o", "o", "--block-size", "7"),
                                  QuantizeOptions.int4())

