"""``cortex convert``: convert a model (HF folder, PyTorch checkpoint, GGUF file, MLX folder,
or a repo id in the local Hugging Face cache) to MLX layout or GGUF."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .. import _core
from ..converter import ConversionConfig, MLXConverter, QuantizationRecipe, default_output_name

RECIPES = {
    "speed": QuantizationRecipe.SPEED_4BIT,
    "balanced": QuantizationRecipe.BALANCED_5BIT,
    "quality": QuantizationRecipe.QUALITY_8BIT,
    "mixed": QuantizationRecipe.MIXED_PRECISION,
    "none": QuantizationRecipe.NONE,
}


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(
        name, help="convert a model to a quantized MLX folder or GGUF file", description=__doc__
    )
    p.add_argument("source", metavar="SRC", help="model folder, .gguf/.bin file, or org/name in the HF cache")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="output folder (with --format gguf also a .gguf file); "
        "default: ~/.cortex/mlx_models/<name>_<recipe>",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="speed",
        help="speed=4-bit, balanced=5-bit, quality=8-bit, mixed=6-bit embeddings/head + 4-bit "
        "projections, none=float (default: speed)",
    )
    p.add_argument("--q-bits", type=int, choices=_core.SUPPORTED_BITS, help="bits for every quantized matrix")
    groups = _core.SUPPORTED_GROUP_SIZES
    p.add_argument("--q-group-size", type=int, choices=groups, default=64, help="default: %(default)s")
    p.add_argument("--format", choices=("mlx", "gguf"), default="mlx", help="default: %(default)s")
    p.add_argument("--no-validate", action="store_true", help="skip loading and measuring the result")


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    config = ConversionConfig(
        quantization=recipe,
        group_size=args.q_group_size,
        validate_conversion=not args.no_validate,
        output_format=args.format,
        cache_converted=False,
    )
    converter = MLXConverter()
    gguf_file = None
    if args.output is None:
        output = converter.cache_dir / default_output_name(args.source, recipe)
    elif args.format == "gguf" and args.output.endswith(".gguf"):
        # A single file: convert into a scratch folder beside it, then move the file.
        gguf_file = Path(args.output).expanduser().resolve()
        output = gguf_file.with_name(f".{gguf_file.name}.cortex-convert")
    else:
        output = Path(args.output).expanduser().resolve()
    try:
        ok, message, path = converter._convert(args.source, output, config, bits_override=args.q_bits)
    except (OSError, ValueError) as err:
        ok, message, path = False, str(err), None
    if ok and path is not None and gguf_file is not None:
        (produced,) = path.glob("*.gguf")
        os.replace(produced, gguf_file)
        shutil.rmtree(path)
        message = message.replace(str(path), str(gguf_file))
    print(message)
    return 0 if ok else 1
