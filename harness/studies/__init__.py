"""Studies: a YAML file describes a search (Optuna) over models, datasets and settings, then the
final seed runs of the selected configurations (MLflow). See docs/studies.md for the file
format and harness/studies/runner.py for how a study runs, resumes and is shared by workers."""

from harness.studies.schema import StudySpecError
from harness.studies.validation import load_study

__all__ = ["StudySpecError", "load_study"]
