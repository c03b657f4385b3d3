"""scm-distill: continuous-time consistency distillation (sCM, arXiv 2410.11081v2) for diffusers pipelines."""

__version__ = "0.1.0"


def load_student(folder, network, call=None):
    """The exported student of a module teacher loaded into `network` (see scm_distill.export.module_pipeline)."""
    from .export.module_pipeline import load_student as load
    from .export.module_pipeline import plain_call

    return load(folder, network, call or plain_call)
