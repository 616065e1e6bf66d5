"""Reference column: ONNX Runtime GenAI on SmolLM2-135M-Instruct, batch 1, CPU, fp32 and int4.

    python bench/reference_genai.py [--repeats 3] [--threads 2] [--skip-build] [--out PATH]

Run it with the main venv's python (.venv). It

1. fetches the model through llmopt (a GGUF file, cached) and turns it into a Hugging Face
   directory under .cache/smollm2-hf/ (transformers dequantizes the GGUF to fp32; done once);
2. creates .venv-genai/ (its own onnxruntime, apart from the main venv's onnxruntime-gpu) if
   missing and installs onnxruntime-genai plus what its model builder imports;
3. builds fp32 and int4 CPU models with onnxruntime_genai.models.builder into .cache/genai/
   (skipped with --skip-build, which reuses what is there);
4. measures both with onnxruntime_genai's Python API, run in .venv-genai (this same file in
   --worker mode): the fixed ~100-token prompt below, 128 new tokens, greedy, EOS held off by
   min_length, one warm-up run per model, then --repeats runs alternating fp32/int4; medians.

Prefill tokens/s = prompt tokens / time to first token (from creating the generator, which
allocates the KV cache, to the first new token being available). Decode tokens/s = (new
tokens - 1) / time from the first new token to the last. JSON goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
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

from decode_cpu import PROMPT  # noqa: E402  (the same prompt as llmopt's side of the run)


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-build", action="store_true",
                        help="reuse the models already built under .cache/genai/")
    parser.add_argument("--out", default="bench/results/reference_genai.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    hf = ensure_hf_dir()
    install_s = ensure_venv()
    build_s: dict[str, float] = {}
    for precision in PRECISIONS:
        if args.skip_build:
            if not (model_dir(precision) / "genai_config.json").exists():
                sys.exit(f"--skip-build: no built model at {model_dir(precision)}")
        else:
            build_s[precision] = round(build(precision), 1)

    command = [str(VENV_PY), str(Path(__file__).resolve()), "--worker",
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    log("measuring: " + shlex.join(command))
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    measured = json.loads(done.stdout)
    load_end = os.getloadavg()

    record = {
        "benchmark": "reference_genai",
        "command": shlex.join(["python", "bench/reference_genai.py", *sys.argv[1:]]),
        "time": started,
        "machine": {
            "cpu": cpu_name(),
            "cores": cores(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
        },
        "versions": measured.pop("versions"),
        "model": {
            "name": MODEL_NAME,
            "gguf": hf["gguf"],
            "hf_dir": str(HF_DIR.relative_to(ROOT)),
            "note": "fp32 weights are the GGUF's (Q4_1) weights dequantized by transformers; "
                    "int4 is the builder's own MatMulNBits quantization of those",
            "onnx": {p: str(model_dir(p).relative_to(ROOT)) for p in PRECISIONS},
        },
        "venv_install_s": None if install_s is None else round(install_s, 1),
        "build_s": build_s or None,
        **measured,
    }
    text = json.dumps(record, indent=2) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.stdout.write(text)


# --------------------------------------------------------------------------- worker (.venv-genai)


def worker(args: argparse.Namespace) -> None:
    import onnxruntime
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(str(HF_DIR))(PROMPT)["input_ids"]
    ids = list(hf_ids[: args.prompt_tokens])
    total = len(ids) + args.new_tokens
    session = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}

    models = {}
    tokenizer_match = {}
    for precision in PRECISIONS:
        config = og.Config(str(model_dir(precision)))
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        models[precision] = og.Model(config)
        og_ids = list(og.Tokenizer(models[precision]).encode(PROMPT))
        tokenizer_match[precision] = og_ids[: args.prompt_tokens] == ids

    def run(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total,
                                  batch_size=1)
        generator = og.Generator(model, params)
        setup = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        new = 1
        while new < args.new_tokens and not generator.is_done():
            generator.generate_next_token()
            new += 1
        end = time.perf_counter()
        sequence = [int(t) for t in generator.get_sequence(0)]
        if new != args.new_tokens or len(sequence) != total:
            raise RuntimeError(f"generated {new} tokens ({len(sequence)} in all), "
                               f"wanted {args.new_tokens}")
        run.last = sequence[len(ids):]  # type: ignore[attr-defined]
        ttft = first - start
        return {"setup_s": setup - start, "ttft_s": ttft,
                "prefill_tokens_per_s": len(ids) / ttft,
                "decode_s": end - first,
                "decode_tokens_per_s": (new - 1) / (end - first)}

    samples = {}
    for precision, model in models.items():
        run(model)  # warm-up, full length
        text = og.Tokenizer(model).decode(run.last)  # type: ignore[attr-defined]
        samples[precision] = {"tokens": run.last[:16], "text": text[:300]}  # type: ignore[attr-defined]
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    loads = []
    for _ in range(args.repeats):
        loads.append([round(x, 2) for x in os.getloadavg()])
        for precision, model in models.items():
            runs[precision].append(run(model))
    median = {p: {k: statistics.median(r[k] for r in values) for k in values[0]}
              for p, values in runs.items()}
    json.dump({
        "versions": {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__,
                     "python_genai_venv": platform.python_version()},
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "threads": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1,
                    "how": "og.Config.overlay of model.decoder.session_options"},
        "repeats": args.repeats,
        "greedy": True,
        "eos": "held off with min_length = max_length = prompt + new tokens",
        "tokenizer": "transformers AutoTokenizer of .cache/smollm2-hf (the GGUF's tokenizer)",
        "genai_tokenizer_matches": tokenizer_match,
        "loadavg_per_repeat": loads,
        "median": {p: {k: round(v, 4) for k, v in m.items()} for p, m in median.items()},
        "runs": {p: [{k: round(v, 4) for k, v in r.items()} for r in values]
                 for p, values in runs.items()},
        "first_tokens": samples,
    }, sys.stdout)


if __name__ == "__main__":
    main()
