"""rbridge core: the science of ranking pre-training corpora with small proxy models.

Importable and testable without Prefect; the orchestration lives in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
