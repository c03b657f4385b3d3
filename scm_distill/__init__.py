"""scm-distill: continuous-time consistency distillation (sCM, arXiv 2410.11081v2) for diffusers pipelines."""

__version__ = "0.1.0"
