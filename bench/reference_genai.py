"""Build the ONNX Runtime GenAI reference: its venv and its fp32 / int4 SmolLM2-135M-Instruct.

    python bench/reference_genai.py [--rebuild]

Run it with the main venv's python (.venv). It

1. fetches the model through llmopt (a GGUF file, cached) and turns it into a Hugging Face
   directory under .cache/smollm2-hf/ (transformers dequantizes the GGUF to fp32; done once);
2. creates .venv-genai/ (its own onnxruntime, apart from the main venv's onnxruntime-gpu) if
   missing and installs onnxruntime-genai plus what its model builder imports;
3. builds fp32 and int4 CPU models with onnxruntime_genai.models.builder into .cache/genai/
   (those already built are kept unless --rebuild).

Measuring is not done here: ``llmopt bench bench/configs/vs_genai.yaml`` runs these folders
(``runtime: genai`` packages) through GenAI in .venv-genai beside llmopt's packages, in one
interleaved run (llmopt/bench/genai_worker.py is the worker it starts there).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
HF_DIR = CACHE / "smollm2-hf"
GENAI_DIR = CACHE / "genai"
VENV = ROOT / ".venv-genai"
VENV_PY = VENV / "bin" / "python"
MODEL_NAME = "smollm2-135m-instruct"
PRECISIONS = ("fp32", "int4")
# What the builder imports (onnx_ir, onnx, torch, transformers) besides onnxruntime-genai;
# torch pinned to the main venv's version (a local CPU wheel), the rest as pip resolves them.
GENAI_PACKAGES = ["onnxruntime-genai", "torch==2.13.0", "transformers", "onnx_ir", "onnx"]


def log(message: str) -> None:
    print(f"[reference_genai] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- orchestration


def ensure_hf_dir() -> dict[str, str]:
    """A Hugging Face directory for the builder, made once from llmopt's cached GGUF."""
    from llmopt.models import fetch

    gguf = Path(str(fetch(MODEL_NAME)))
    info = {"gguf": str(gguf), "hf_dir": str(HF_DIR)}
    if (HF_DIR / "config.json").exists() and (HF_DIR / "model.safetensors").exists() \
            and (HF_DIR / "tokenizer.json").exists():
        return info
    log(f"converting {gguf.name} to a Hugging Face directory at {HF_DIR}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    # save_pretrained refuses a model marked as GGUF-quantized: rebuild it without that mark.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    probe = torch.tensor([[1, 504, 2821, 282, 10776]])
    with torch.no_grad():
        diff = (model(probe).logits - loaded(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"rebuilt model differs from the GGUF load: max |dlogits| {diff}")
    tmp = HF_DIR.with_name(HF_DIR.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    if HF_DIR.exists():
        import shutil
        shutil.rmtree(HF_DIR)
    tmp.rename(HF_DIR)
    return info


def ensure_venv() -> float | None:
    """Create .venv-genai if it is missing; return the install time in seconds (None: existed)."""
    if VENV_PY.exists():
        return None
    log(f"creating {VENV} and installing {' '.join(GENAI_PACKAGES)}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV_PY), "-m", "pip", "install", "--quiet", *GENAI_PACKAGES],
                   check=True)
    return time.perf_counter() - start


def model_dir(precision: str) -> Path:
    return GENAI_DIR / f"smollm2-135m-{precision}-cpu"


def build(precision: str) -> float:
    out = model_dir(precision)
    command = [str(VENV_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(HF_DIR),
               "-o", str(out), "-p", precision, "-e", "cpu",
               "-c", str(GENAI_DIR / "builder-cache")]
    log("building: " + shlex.join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="build the GenAI models again even where they exist")
    args = parser.parse_args()
    ensure_hf_dir()
    install_s = ensure_venv()
    if install_s is not None:
        log(f"installed {VENV} in {install_s:.0f} s")
    for precision in PRECISIONS:
        if args.rebuild or not (model_dir(precision) / "genai_config.json").exists():
            log(f"built {model_dir(precision)} in {build(precision):.0f} s")
        else:
            log(f"kept {model_dir(precision)} (--rebuild builds it again)")


if __name__ == "__main__":
    main()
