"""Existing EM evaluations (the EM repositories' CSV) as generations and scores in the store."""

from __future__ import annotations

import hashlib
from pathlib import Path

from emc.behaviour.questions import Question, render_question
from emc.behaviour.records import Score
from emc.config import ExperimentConfig
from emc.importer.em_eval import read_em_eval_csv
from emc.models import describe_model
from emc.runs import recorded_run
from emc.store import Store
from emc.store.behaviour import GenerationRow, generation_key, insert_generations, upsert_scores


def import_em_eval(
    config: ExperimentConfig,
    data_dir: Path,
    path: Path,
    model: str = "adapted",
    judge: str | None = None,
) -> dict:
    """Store the file's answers under `model` (base, adapted or a name) with their scores.

    Answers of base or adapted get the model's id and its chat-template context, so response
    features can be read from them; any other name is stored as given. Ids come from the file's
    content and row, so importing the same file twice adds nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    parsed = read_em_eval_csv(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    judge_model = judge or f"imported:{path.name}"
    store = Store.in_data_dir(data_dir)
    store.ensure_schema()
    tokenizer = _tokenizer(config) if model in ("base", "adapted") else None
    params = {"path": str(path), "model": model, "judge": judge_model, "sha256": digest}
    with recorded_run(store, "cli", "eval-import", params) as run:
        rows, scores = [], []
        for item in parsed.rows:
            named = item.model or model
            model_id = (
                describe_model(config, named).model_id if named in ("base", "adapted") else named
            )
            question = Question(id=item.question_id, paraphrases=[item.question])
            context = (
                render_question(question, 0, tokenizer)
                if tokenizer is not None and named in ("base", "adapted")
                else item.question
            )
            gid = generation_key(
                model_id, "imported", item.question_id, item.row_number, {"file": digest}
            )
            rows.append(
                GenerationRow(
                    generation_id=gid,
                    run_id=run.run_id,
                    model_id=model_id,
                    purpose="imported",
                    question_id=item.question_id,
                    question=item.question,
                    context=context,
                    sample_index=item.row_number,
                    text=item.response,
                    finish_reason="imported",
                )
            )
            common = {"generation_id": gid, "judge_model": judge_model, "method": "imported"}
            scores.append(
                Score(
                    **common,
                    metric="aligned",
                    score=item.aligned,
                    label=item.aligned_label,
                    status="ok" if item.aligned is not None or item.aligned_label else "unscorable",
                )
            )
            scores.append(
                Score(
                    **common,
                    metric="coherent",
                    score=item.coherent,
                    status="ok" if item.coherent is not None else "unscorable",
                )
            )
        new = insert_generations(store, rows)
        upsert_scores(store, scores, run.run_id)
        report = {
            "rows": len(parsed.rows),
            "new": new,
            "rejected_count": len(parsed.rejected),
            "rejected": [r.model_dump() for r in parsed.rejected],
            "judge_model": judge_model,
        }
        run.summary = report
    return report


def _tokenizer(config: ExperimentConfig):
    from emc.models.hf import load_tokenizer
    from emc.models.refs import resolve_model_dir

    return load_tokenizer(resolve_model_dir(config.models.base.ref, config.models.base.revision))
