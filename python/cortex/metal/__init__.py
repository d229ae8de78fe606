"""Compatibility paths of the original MLX-based project (``cortex.metal.mlx_converter``,
``cortex.metal.mlx_accelerator``)."""
