"""GPU speed of Cortex on the peers' Llama-shaped models, beside the peers' figures from the
same sitting (``../shared/gpu/peers/README.md`` builds the models and times the peers).

    python benches/gpu_speed.py --models /tmp/hfm [--gguf /tmp/g] [--work /tmp/cortex-bench]
        [--shapes 1B,8B] [--forms bf16,4bit,8bit,q4_0] [--peers DIR] [--gen-tokens 128] [--profile]

For each shape (an HF bf16 folder ``--models/<shape>``) and weight form (the folder itself in
bf16; Cortex's own MLX conversions at 4 and 8 bits, group 64, made once into ``--work``;
llama.cpp's ``<shape>-Q4_0.gguf`` from ``--gguf``), the model is loaded on ``cuda:0`` and
timed with greedy decoding that ignores end-of-sequence:

- decode at batch 1: ``--gen-tokens`` tokens after a 128-token prompt, the tokens after the
  first over the time they took (``cpu_speed.bench_cortex``: best of 2, after a warm-up);
- aggregate decode at 8 and 32 sequences (one engine, 128-token prompts): ``B · (N - 1)``
  over the time of ``N`` tokens minus the time of one (the peers' method);
- prefill of 512 tokens: prompt tokens over the time to the first token (best of 3);
- GPU memory: the weights as uploaded plus the batch-32 engine's KV cache.

With ``--peers DIR`` (the folder the peers' calls wrote: hf.json, mlx.json, llama-bench.md,
batched.md) each row also prints the matching peer figure and the ratio (> 1: Cortex is
faster). With ``--profile``, each model's batch-1 decode runs once more op by op (no CUDA
graphs), every operation synchronized and timed, and the time per operation is printed:
where a decoded token's time goes, launch and synchronization costs included. (Do not set
``CORTEX_PROFILE=1`` for a benchmark: it turns graphs off for every figure.)
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

from cpu_speed import bench_cortex

import cortex
from cortex import ConversionConfig, MLXConverter, QuantizationRecipe, _core

FORMS = {"bf16": "bf16", "4bit": "MLX 4-bit g64", "8bit": "MLX 8-bit g64", "q4_0": "GGUF Q4_0"}


def prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    # Token ids as mlx_bench.py's prompts take them (100, 101, ...), shifted per sequence.
    return [[(100 + 7 * s + i) % vocab for i in range(length)] for s in range(n)]


def prefill(model: cortex.Model, tok: cortex.Tokenizer, ids: list[int]) -> float:
    best = 0.0
    for rep in range(4):
        # A new first token each time: no run finds the last one's blocks in the prefix cache.
        fresh = [(ids[0] + rep) % model.config["vocab_size"], *ids[1:]]
        start = time.perf_counter()
        for _ in cortex.stream_generate(model, tok, fresh, max_tokens=1, ignore_eos=True):
            pass
        if rep > 0:
            best = max(best, len(ids) / (time.perf_counter() - start))
    return best


def aggregate(engine: cortex.Engine, batch: list[list[int]], n_gen: int) -> float:
    def run(n: int) -> float:
        start = time.perf_counter()
        outs = engine.generate_batch(batch, max_tokens=n, ignore_eos=True, temperature=0.0)
        for o in outs:
            if o.error is not None:
                raise o.error
        return time.perf_counter() - start

    run(n_gen)  # warm-up at full length
    t1 = min(run(1) for _ in range(2))
    tn = min(run(n_gen) for _ in range(2))
    return len(batch) * (n_gen - 1) / (tn - t1)


def convert(src: Path, work: Path, bits: int) -> Path:
    out = work / f"{src.name}-{bits}bit-g64"
    if (out / "config.json").is_file():
        return out
    recipe = QuantizationRecipe.SPEED_4BIT if bits == 4 else QuantizationRecipe.QUALITY_8BIT
    config = ConversionConfig(
        quantization=recipe, group_size=64, cache_converted=False, validate_conversion=False
    )
    ok, message, path = MLXConverter(str(work)).convert_model(str(src), out.name, config)
    if not ok or path is None:
        raise SystemExit(f"converting {src} to {bits} bits failed: {message}")
    return Path(path)


def bench(path: Path, n_gen: int, profile: bool) -> dict[str, float]:
    start = time.perf_counter()
    model, tok = cortex.load(str(path), device="cuda")
    load_s = time.perf_counter() - start
    vocab = int(model.config["vocab_size"])
    r: dict[str, float] = {"load_s": load_s}
    r["decode_b1"] = bench_cortex(model, tok, prompts(vocab, 1, 128)[0], n_gen, repeats=2)["decode_tps"]
    r["prefill_512"] = prefill(model, tok, prompts(vocab, 1, 512)[0])
    engine = cortex.Engine(model, tok, max_batch_size=32, kv_cache_tokens=32 * 512)
    for b in (8, 32):
        r[f"decode_b{b}"] = aggregate(engine, prompts(vocab, b, 128), n_gen)
        # What the model holds on the GPU: its weights as uploaded, and the batch-32 engine's
    # KV cache. (Free memory says nothing here: freed buffers stay in the driver's pool.)
    stats = engine.stats()
    kv = stats["kv_blocks_total"] * stats["kv_block_size"] * model.kv_bytes_per_token
    r["gpu_gb"] = (model.weight_bytes + kv) / 1e9
    if profile:
        # One more batch-1 decode and one more prefill, op by op, each operation charged its
        # time. The prefill's prompt starts with a token `prefill` did not use, or the
        # prefix cache would leave it one block of rows.
        for what, length, n in (("decode", 128, n_gen), ("prefill", 512, 1)):
            _core.profile(reset=True, enable=True)
            ids = prompts(vocab, 1, length)[0]
            ids[0] = (ids[0] + 4) % vocab
            for _ in cortex.stream_generate(model, tok, ids, max_tokens=n, ignore_eos=True):
                pass
            rows = _core.profile(reset=True, enable=False)
            total = sum(s for _, _, s in rows)
            print(f"  where {what} time goes ({n} tokens after {length}, each op synchronized):")
            for op, calls, secs in sorted(rows, key=lambda r: -r[2]):
                print(f"  {op:<24} {calls:>7} calls {secs * 1e3:>9.1f} ms {secs / total:>6.1%}")
    del engine, model, tok
    gc.collect()
    return r


def peer_figures(peers: Path | None) -> dict[tuple[str, str], dict[str, tuple[str, float]]]:
    """`(shape, form)` → `{measure: (peer, tok/s)}` from the peers' result files."""
    out: dict[tuple[str, str], dict[str, tuple[str, float]]] = {}
    if peers is None:
        return out

    def put(shape: str, form: str, measure: str, who: str, value: float) -> None:
        out.setdefault((shape, form), {})[measure] = (who, value)

    hf = peers / "hf.json"
    if hf.is_file():
        data = json.loads(hf.read_text())
        for shape in ("1B", "8B"):
            r = data.get(shape, {})
            if "static_autocompile_b1_tok_s" in r:
                put(shape, "bf16", "decode_b1", "transformers", r["static_autocompile_b1_tok_s"])
            if "eager_b32_tok_s" in r:
                put(shape, "bf16", "decode_b32", "transformers", r["eager_b32_tok_s"])
    mlx = peers / "mlx.json"
    if mlx.is_file():
        data = json.loads(mlx.read_text())
        for name, r in data.items():
            m = re.fullmatch(r"(\dB)-(bf16|q4g64|q8g64)", name)
            if not m or "error" in r:
                continue
            form = {"bf16": "bf16", "q4g64": "4bit", "q8g64": "8bit"}[m.group(2)]
            put(m.group(1), form, "decode_b1", "mlx-lm", r["p128_decode_tok_s"])
            put(m.group(1), form, "prefill_512", "mlx-lm", r["p512_prefill_tok_s"])
    bench_md = peers / "llama-bench.md"
    if bench_md.is_file():
        # | model | size | params | backend | ngl | fa | test | t/s |, models in file order 1B, 8B
        for line in bench_md.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 8 or not cells[-2].startswith(("pp", "tg")):
                continue
            shape = "8B" if cells[2].startswith("8") else "1B"
            form = {"Q4_0": "q4_0", "Q8_0": "8bit", "F16": "bf16"}.get(cells[0].split()[-1], "")
            value = float(cells[-1].split("±")[0])
            if form == "q4_0":
                put(shape, form, "prefill_512" if cells[-2] == "pp512" else "decode_b1", "llama.cpp", value)
    batched = peers / "batched.md"
    if batched.is_file():
        # llama-batched-bench rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | ...
        # The 1B file's rows come first, then the 8B's.
        rows = [
            [c.strip() for c in line.strip().strip("|").split("|")]
            for line in batched.read_text().splitlines()
            if re.match(r"\|\s*\d", line)
        ]
        half = len(rows) // 2
        for i, cells in enumerate(rows):
            shape = "1B" if i < half else "8B"
            b = int(cells[2])
            if b in (8, 32):
                put(shape, "q4_0", f"decode_b{b}", "llama.cpp", float(cells[7]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="folder of HF bf16 models, one per shape")
    p.add_argument("--gguf", type=Path, default=None, help="folder of <shape>-Q4_0.gguf files")
    p.add_argument("--work", type=Path, default=Path("/tmp/cortex-bench"), help="where conversions go")
    p.add_argument("--shapes", default="1B,8B")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--peers", type=Path, default=None, help="the peers' result folder")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="also time one batch-1 decode op by op")
    args = p.parse_args()
    if _core.cuda_device_count() == 0:
        raise SystemExit("no CUDA GPU: this benchmark needs the GPU build of Cortex on a machine with a GPU")
    info = _core.cuda_info(0)
    cc = ".".join(map(str, info["compute_capability"]))
    gib = info["total_memory"] / 2**30
    print(f"{info['name']}, {gib:.0f} GiB, compute capability {cc}; {args.gen_tokens} generated tokens")
    args.work.mkdir(parents=True, exist_ok=True)
    peers = peer_figures(args.peers)
    results: list[tuple[str, str, dict[str, float]]] = []
    for shape in args.shapes.split(","):
        src = args.models / shape
        if not src.is_dir():
            print(f"{shape}: skipped ({src} is missing)")
            continue
        for form in args.forms.split(","):
            if form == "bf16":
                path = src
            elif form in ("4bit", "8bit"):
                path = convert(src, args.work, int(form[0]))
            else:
                path = (args.gguf or Path("/nonexistent")) / f"{shape}-Q4_0.gguf"
                if not path.is_file():
                    print(f"{shape} {FORMS[form]}: skipped ({path} is missing)")
                    continue
            r = bench(path, args.gen_tokens, args.profile)
            results.append((shape, form, r))
            print(shape, FORMS[form], json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)

    print(f"\n{'model':<18} {'measure':<12} {'Cortex':>9} {'peer':>13} {'tok/s':>9} {'ratio':>7}")
    labels = {
        "decode_b1": "decode b=1",
        "decode_b8": "decode b=8",
        "decode_b32": "decode b=32",
        "prefill_512": "prefill 512",
    }
    for shape, form, r in results:
        for measure, label in labels.items():
            who, value = peers.get((shape, form), {}).get(measure, ("", 0.0))
            ratio = f"{r[measure] / value:>6.2f}x" if value else f"{'-':>7}"
            peer = f"{who:>13} {value:>9.1f}" if value else f"{'-':>13} {'-':>9}"
            print(f"{shape + ' ' + FORMS[form]:<18} {label:<12} {r[measure]:>9.1f} {peer} {ratio}")
        name = f"{shape} {FORMS[form]}"
        print(f"{name:<18} {'GPU memory':<12} {r['gpu_gb']:>8.2f}G   (load {r['load_s']:.1f} s)")
    print("(tok/s; decode b=8/32 are aggregate over the sequences; ratio > 1: Cortex is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
