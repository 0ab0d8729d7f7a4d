"""Prefect block types of buildkit-pipeline; register them with `prefect block register -m blocks`."""

from blocks.target import BuildKitPipelineTarget

__all__ = ["BuildKitPipelineTarget"]
