"""adaptc: a declarative adapter-spec compiler for PyTorch models."""

from adaptc.spec import Spec, SpecError, SpecIssue, load_spec

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "SpecIssue", "__version__", "load_spec"]
