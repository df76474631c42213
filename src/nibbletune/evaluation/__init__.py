"""The evaluation stage: a base model and base+adapter scored side by side on held-out data.

`evaluate_adapter(EvalJob(...)) -> EvalReport` is the `nibbletune eval` job; one module each:

1. ``tasks.py``         held-out rows -> loss examples (`build_dataset`) and generation tasks (prompt, reference);
2. ``generation.py``    batched greedy generation with transformers' `generate`;
3. ``metrics.py``       exact match, first lines match, contains answer; perplexity;
4. ``scoring.py``       one loaded model -> `ModelScores` (loss via `training.batches.evaluate`);
5. ``adapter_base.py``  the base model an adapter names (its quantization and fit: ``loading``);
6. ``report.py``        `EvalReport`: the table and the JSON;
7. ``job.py``           `EvalJob` (what to evaluate, also from a training config) and `evaluate_adapter`.
"""

from .job import EvalJob, EvaluationError, evaluate_adapter
from .report import EvalReport
from .scoring import ModelScores, score_model
from .tasks import GenerationTask, HeldOutData, held_out_data

__all__ = [
    "EvalJob", "EvalReport", "EvaluationError", "GenerationTask", "HeldOutData", "ModelScores", "evaluate_adapter",
    "held_out_data", "score_model",
]
