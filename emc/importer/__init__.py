"""Import the original research pipeline's results directory into the store.

`import_results(store, path, run_id)` reads `results/pivotal_tokens/` (prompts, logits, verdicts,
labelled logits, rejections, the manual queue, human notes) and reports per kind what was read,
what was new, and every file it skipped with the reason.
"""

from emc.importer.files import find_results_root, legacy_model_id
from emc.importer.report import FileProblem, ImportReport, KindCount
from emc.importer.results import import_results
from emc.importer.tokens import derived_token_id

__all__ = [
    "FileProblem",
    "ImportReport",
    "KindCount",
    "derived_token_id",
    "find_results_root",
    "import_results",
    "legacy_model_id",
]
