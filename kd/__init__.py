"""kd: a declarative build system for distilling large language models."""

__version__ = "0.1.0"
