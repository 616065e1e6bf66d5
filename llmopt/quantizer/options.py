"""Options for ``llmopt.quantize``, with presets chosen by measurement (see docs in README)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from llmopt.errors import InvalidInputError

METHODS = ("int8", "int8_dynamic", "int8_static", "int8_per_token", "int4")
CALIBRATIONS = ("minmax", "entropy", "percentile")
INT4_ALGORITHMS = ("auto", "gguf", "rtn", "mse", "hqq", "gptq")
LM_HEAD_BITS = (None, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
# BERT-style name of layer 3's FFN down-projection: the MatMul whose int8 costs
# all-MiniLM-L6-v2 the most cosine under per-token int8 + SmoothQuant (the sensitivity table of
# bench/results/encoder_int8.md: min 0.9974 -> 0.9984 kept float; the next ones gain < 0.0005)
ENCODER_KEEP_FLOAT = ("layer.3.output.dense.",)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize. Use the presets: :meth:`int8` (weight-only, the default for decoders
    and encoders), :meth:`int8_encoder` (encoders where llmopt's CPU kernels cannot run),
    :meth:`int8_dynamic`,
    :meth:`int8_static`, :meth:`int4`.

    ``keep_float`` lists weights left in float, matched as substrings of initializer names
    (``"lm_head"``, ``"embed"``, ``"layers.0."``...). Only MatMuls whose second input is a
    weight are quantized: activation x activation products (attention scores) never are.
    ``lm_head_bits`` (weight-only int8/int4) quantizes the LM head on its own terms: 8 bits by
    default (the fp32 head is a third of SmolLM2's bytes read per token; 8 bits cost +0.1%
    perplexity), 4, or None for float.
    """

    method: str = "int8"
    per_channel: bool = False
    keep_float: tuple[str, ...] = ()
    lm_head_bits: int | None = 8
    # int8 static
    calibration: str = "minmax"
    calibration_file: str | None = None
    calibration_samples: int = 16
    calibration_length: int = 128
    percentile: float = 99.999
    # int8 per token: SmoothQuant's migration strength (None: no smoothing)
    smooth_alpha: float | None = 0.5
    # int8 per token: each activation as two int8 codes, a dynamic per-tensor one and its
    # rounding residual, through two integer GEMMs (about 16-bit activations)
    split_activations: bool = False
    # int4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "auto"
    quantize_embeddings: bool = False
    # validation and fidelity
    evaluate: bool = True

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("calibration", self.calibration, CALIBRATIONS)
        _one_of("algorithm", self.algorithm, INT4_ALGORITHMS)
        if self.block_size not in BLOCK_SIZES:
            raise InvalidInputError(f"int4 block size {self.block_size} is not supported",
                                    fix=f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise InvalidInputError(f"lm_head_bits {self.lm_head_bits} is not supported",
                                    fix="use 8, 4 or None (float)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidInputError("accuracy_level must be 0-4",
                                    fix="4 (int8 compute, fastest on CPU) or 0 (default)")
        if not 1 <= self.calibration_samples <= 10_000 or not self.calibration_length >= 8:
            raise InvalidInputError("calibration needs 1-10000 samples of >= 8 tokens",
                                    fix="e.g. calibration_samples=16, calibration_length=128")
        if not 90.0 <= self.percentile <= 100.0:
            raise InvalidInputError("percentile must be in [90, 100]", fix="e.g. 99.999")
        if self.split_activations and self.method != "int8_per_token":
            raise InvalidInputError("split_activations is an int8_per_token option",
                                    fix="use QuantizeOptions.int8_encoder(split_activations=True)")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise InvalidInputError("smooth_alpha must be in [0, 1]",
                                    fix="e.g. 0.5, or None for no smoothing")

    @classmethod
    def int8(cls, block_size: int = 32) -> QuantizeOptions:
        """Weight-only int8 (MatMulNBits, symmetric blocks of 32), int8 compute. Activations
        are quantized per block inside the kernel, so outlier channels cost little: on SmolLM2
        perplexity +1.0% where dynamic int8 costs +70% (measured, see README)."""
        return cls(method="int8", block_size=block_size, symmetric=True)

    @classmethod
    def int8_dynamic(cls, per_channel: bool = False,
                     keep_float: tuple[str, ...] = ("lm_head",)) -> QuantizeOptions:
        """ONNX Runtime's dynamic int8 (MatMulInteger): weights per tensor (or per channel),
        activations per tensor per call. The LM head stays float."""
        return cls(method="int8_dynamic", per_channel=per_channel, keep_float=keep_float)

    @classmethod
    def int8_static(cls, calibration: str = "minmax", calibration_file: str | None = None,
                    samples: int = 16) -> QuantizeOptions:
        """QDQ int8 with activation ranges calibrated on text (a built-in corpus by default).
        The LM head stays float."""
        return cls(method="int8_static", calibration=calibration,
                   calibration_file=calibration_file, calibration_samples=samples,
                   keep_float=("lm_head",))

    @classmethod
    def int8_encoder(cls, smooth_alpha: float | None = 0.5,
                     keep_float: tuple[str, ...] = ENCODER_KEEP_FLOAT,
                     split_activations: bool = False) -> QuantizeOptions:
        """Integer GEMMs for encoders, the faster encoder int8 on a CPU without AVX-512 VNNI
        (where it has it, :meth:`int8` on llmopt's kernels is both faster and more faithful,
        and the default): activations in int8
        with a scale per token, weights per output channel, SmoothQuant scaling (strength
        ``smooth_alpha``, calibrated on the built-in corpus) and layer 3's FFN
        down-projection in float (the most sensitive MatMul of MiniLM-L6 in a per-MatMul
        sweep). all-MiniLM-L6-v2: cosine min 0.998 where ONNX Runtime's per-tensor dynamic
        int8 gives 0.92 (bench/results/encoder_int8.md has the speed).

        ``split_activations=True`` is the faithful form: every MatMul integer, each
        activation as a per-tensor int8 code plus an int8 code of its rounding residual (two
        integer GEMMs, about 16-bit activations), so only the int8 weights cost anything:
        cosine min 0.9992 on all-MiniLM-L6-v2, at fewer sentences/s than the per-token form.
        It needs no smoothing and keeps no MatMul in float unless asked."""
        if split_activations:
            return cls(method="int8_per_token", smooth_alpha=None, keep_float=(),
                       split_activations=True)
        return cls(method="int8_per_token", smooth_alpha=smooth_alpha, keep_float=keep_float)

    @classmethod
    def int4(cls, block_size: int = 32, algorithm: str = "auto", symmetric: bool = False,
             lm_head_bits: int | None = 8) -> QuantizeOptions:
        """Weight-only int4 (MatMulNBits), int8 compute (accuracy level 4), asymmetric blocks
        of 32; the LM head in 8 bits and the embeddings in float unless asked (measured).

        ``algorithm="auto"`` reuses a Q4_0/Q4_1/Q4_K GGUF source's own blocks exactly when
        the package came from one (``"gguf"``, no second rounding), and is HQQ otherwise.
        ``"rtn"`` and ``"mse"`` (clipping search) need no float zero points at all."""
        return cls(method="int4", block_size=block_size, algorithm=algorithm,
                   symmetric=symmetric, lm_head_bits=lm_head_bits)

    @classmethod
    def preset(cls, method: str) -> QuantizeOptions:
        """The preset of ``method`` (one of METHODS; ``int8_per_token`` is
        :meth:`int8_encoder`): what ``llmopt quantize --method`` starts from before its flags."""
        _one_of("method", method, METHODS)
        presets: dict[str, Callable[[], QuantizeOptions]] = {
            "int8": cls.int8, "int8_dynamic": cls.int8_dynamic, "int8_static": cls.int8_static,
            "int8_per_token": cls.int8_encoder, "int4": cls.int4}
        return presets[method]()

    def with_(self, **changes: object) -> QuantizeOptions:
        return replace(self, **changes)  # type: ignore[arg-type]


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"unknown {name} {value!r}",
                                fix=f"use one of: {', '.join(allowed)}")
