"""Numbered schema migrations. Append new ones; never edit a migration that has shipped.

DDL is transactional in DuckDB, so each migration and its version row commit together. Secondary
indexes are avoided on purpose: they block later ALTERs.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs and models",
        (
            """
            CREATE TABLE runs (
                run_id           VARCHAR PRIMARY KEY,
                kind             VARCHAR NOT NULL,   -- flow | cli
                name             VARCHAR NOT NULL,
                status           VARCHAR NOT NULL,   -- running | completed | failed
                started_at       TIMESTAMPTZ NOT NULL,
                finished_at      TIMESTAMPTZ,
                params           JSON,
                code_revision    VARCHAR,
                code_dirty       BOOLEAN,
                emc_version      VARCHAR NOT NULL,
                package_versions JSON,
                host             VARCHAR,
                flow_run_id      VARCHAR,
                error            VARCHAR,
                summary          JSON
            )
            """,
            """
            CREATE TABLE models (
                model_id        VARCHAR PRIMARY KEY,  -- readable slug + fingerprint
                slug            VARCHAR NOT NULL,
                fingerprint     VARCHAR NOT NULL,
                role            VARCHAR NOT NULL,     -- base | adapted
                base_ref        VARCHAR NOT NULL,
                adapter_ref     VARCHAR,
                merged          BOOLEAN NOT NULL,
                transcoders_ref VARCHAR NOT NULL,
                backend         VARCHAR NOT NULL,
                dtype           VARCHAR NOT NULL,
                device          VARCHAR NOT NULL,
                first_run_id    VARCHAR NOT NULL,
                created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE model_checks (
                run_id       VARCHAR NOT NULL,
                model_id     VARCHAR NOT NULL,
                prompt       VARCHAR NOT NULL,
                input_ids    INTEGER[] NOT NULL,
                top_token_ids INTEGER[] NOT NULL,
                top_tokens   VARCHAR[] NOT NULL,
                top_probs    DOUBLE[] NOT NULL,
                dtype        VARCHAR NOT NULL,
                backend      VARCHAR NOT NULL,
                status       VARCHAR NOT NULL,        -- ok | failed
                error        VARCHAR,
                created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (run_id, model_id, prompt)
            )
            """,
        ),
    ),
    Migration(
        2,
        "organism builds",
        (
            """
            CREATE TABLE organism_builds (
                recipe_hash   VARCHAR PRIMARY KEY,
                variant       VARCHAR NOT NULL,
                path          VARCHAR NOT NULL,
                run_id        VARCHAR NOT NULL,
                built_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
                build_seconds DOUBLE,
                recipe        JSON NOT NULL,
                report        JSON NOT NULL
            )
            """,
        ),
    ),
    Migration(
        3,
        "llm calls",
        (
            """
            CREATE TABLE llm_calls (
                call_id           VARCHAR PRIMARY KEY,
                run_id            VARCHAR,
                purpose           VARCHAR NOT NULL,   -- judge | generator | ...
                model             VARCHAR NOT NULL,
                base_url          VARCHAR,
                request           JSON NOT NULL,      -- messages and options; never the key
                response_raw      VARCHAR,
                status            VARCHAR NOT NULL,   -- ok | json_error | schema_error | ...
                error             VARCHAR,
                latency_s         DOUBLE,
                prompt_tokens     INTEGER,
                completion_tokens INTEGER,
                attempts          INTEGER NOT NULL,
                created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
    Migration(
        4,
        "discovery: prompts, next tokens, divergences, judgements, labels, review queue",
        (
            """
            CREATE TABLE prompts (
                prompt_id        VARCHAR PRIMARY KEY,   -- hash of format, text, prefix
                text             VARCHAR NOT NULL,
                format           VARCHAR NOT NULL,      -- raw | chat | cot
                assistant_prefix VARCHAR NOT NULL,
                name             VARCHAR NOT NULL,
                source           VARCHAR NOT NULL,      -- generator model | human:<name> | file:..
                legacy_id        VARCHAR,
                meta             JSON,
                run_id           VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL
            )
            """,
            """
            CREATE TABLE next_tokens (                  -- what one model read for one prompt
                prompt_id  VARCHAR NOT NULL,
                model_id   VARCHAR NOT NULL,
                run_id     VARCHAR NOT NULL,
                rendered   VARCHAR NOT NULL,
                input_ids  INTEGER[] NOT NULL,
                dtype      VARCHAR NOT NULL,
                backend    VARCHAR NOT NULL,
                status     VARCHAR NOT NULL,            -- ok | failed
                error      VARCHAR,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, model_id)
            )
            """,
            """
            CREATE TABLE logits (   -- each model's top-k, plus the other model's top-k tokens
                prompt_id VARCHAR NOT NULL,
                model_id  VARCHAR NOT NULL,
                token_id  INTEGER NOT NULL,
                token     VARCHAR NOT NULL,
                rank      INTEGER NOT NULL,             -- 0 = most likely, over the whole vocab
                logit     DOUBLE NOT NULL,
                prob      DOUBLE NOT NULL,
                in_top_k  BOOLEAN NOT NULL,
                run_id    VARCHAR NOT NULL,
                PRIMARY KEY (prompt_id, model_id, token_id)
            )
            """,
            """
            CREATE TABLE divergences (
                prompt_id        VARCHAR NOT NULL,
                base_model_id    VARCHAR NOT NULL,
                adapted_model_id VARCHAR NOT NULL,
                run_id           VARCHAR NOT NULL,
                k                INTEGER NOT NULL,
                kl_adapted_base  DOUBLE NOT NULL,
                kl_base_adapted  DOUBLE NOT NULL,
                js               DOUBLE NOT NULL,
                tv               DOUBLE NOT NULL,
                entropy_base     DOUBLE NOT NULL,
                entropy_adapted  DOUBLE NOT NULL,
                entropy_delta    DOUBLE NOT NULL,
                topk_jaccard     DOUBLE NOT NULL,
                p_evil_base      DOUBLE,                -- label-based: filled once labels exist
                p_evil_adapted   DOUBLE,
                p_safe_base      DOUBLE,
                p_safe_adapted   DOUBLE,
                log_odds_base    DOUBLE,
                log_odds_adapted DOUBLE,
                rank_changes     JSON,
                labels_from      VARCHAR,               -- judge:<model> | human:<name>
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id)
            )
            """,
            """
            CREATE TABLE judgements (
                judgement_id     VARCHAR PRIMARY KEY,
                prompt_id        VARCHAR NOT NULL,
                base_model_id    VARCHAR NOT NULL,
                adapted_model_id VARCHAR NOT NULL,
                judge_model      VARCHAR NOT NULL,
                status           VARCHAR NOT NULL,      -- ok | json_error | label_mismatch | ...
                verdict          VARCHAR,               -- evil_injection | ... | bad_prompt
                outcome          VARCHAR,     -- elicited_evil | good_idea_failed | bad_prompt
                summary          VARCHAR,
                reason           VARCHAR,
                raw_response     VARCHAR,
                llm_call_id      VARCHAR,
                error            VARCHAR,
                run_id           VARCHAR NOT NULL,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE token_labels (
                prompt_id    VARCHAR NOT NULL,
                token_id     INTEGER NOT NULL,
                labeller     VARCHAR NOT NULL,          -- judge:<model> | human:<name>
                token        VARCHAR NOT NULL,
                label        VARCHAR NOT NULL,          -- evil | unsure | safe
                judgement_id VARCHAR,
                explanation  VARCHAR,
                run_id       VARCHAR,
                created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, token_id, labeller)
            )
            """,
            """
            CREATE TABLE review_queue (
                prompt_id        VARCHAR PRIMARY KEY,
                state            VARCHAR NOT NULL,      -- pending | in_review | done | rejected
                priority         DOUBLE NOT NULL,
                reason           VARCHAR NOT NULL,
                judgement_id     VARCHAR,
                claimed_by       VARCHAR,
                lease_expires_at TIMESTAMPTZ,
                run_id           VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
    Migration(
        5,
        "human reviews",
        (
            """
            CREATE TABLE reviews (
                review_id     VARCHAR PRIMARY KEY,
                prompt_id     VARCHAR NOT NULL,
                reviewer      VARCHAR NOT NULL,     -- human:<name>
                action        VARCHAR NOT NULL,     -- agree | relabel | reject
                judgement_id  VARCHAR,              -- the judgement the person saw
                disagreed     BOOLEAN NOT NULL,     -- a label differs from the judge's
                explanation   VARCHAR,              -- required when disagreeing
                reject_reason VARCHAR,              -- required when rejecting
                labels        JSON NOT NULL,        -- {token_id: label} as submitted
                source        VARCHAR NOT NULL,     -- dashboard | import:<path> | cli
                run_id        VARCHAR,
                created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
    Migration(
        6,
        "graphs",
        (
            """
            CREATE TABLE graphs (               -- one attribution graph (or its failure)
                graph_id               VARCHAR PRIMARY KEY,  -- hash: prompt, model, targets, params
                prompt_id              VARCHAR NOT NULL,
                model_id               VARCHAR NOT NULL,
                run_id                 VARCHAR NOT NULL,
                targets                VARCHAR NOT NULL,     -- salient | labelled | contrastive
                params                 JSON NOT NULL,        -- target ids, max_feature_nodes, ...
                input_ids              INTEGER[] NOT NULL,
                status                 VARCHAR NOT NULL,     -- ok | failed
                error                  VARCHAR,
                seconds                DOUBLE,               -- circuit-tracer's attribute()
                storage_seconds        DOUBLE,               -- pruning, scores, rows, writes
                replacement            DOUBLE,
                completeness           DOUBLE,
                error_score_mean       DOUBLE,               -- sum |error -> logit| per target
                error_score_ratio      DOUBLE,               -- ... / sum |all -> logit|
                n_active_features      INTEGER,
                n_features             INTEGER,              -- attributed (max_feature_nodes)
                n_errors               INTEGER,
                n_tokens               INTEGER,
                n_logits               INTEGER,
                kept_features          INTEGER,              -- after pruning
                kept_errors            INTEGER,
                kept_edges             INTEGER,
                logit_mismatch         DOUBLE,   -- max |graph prob - discovery prob|
                logit_mismatch_exceeds BOOLEAN,  -- above tracing.logit_tolerance, or ids differ
                side_file              VARCHAR,  -- raw graph, relative to the data directory
                side_file_sha256       VARCHAR,
                side_file_bytes        BIGINT,
                created_at             TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE graph_nodes (          -- the nodes pruning keeps
                graph_id   VARCHAR NOT NULL,
                node       INTEGER NOT NULL,    -- index in the unpruned adjacency
                kind       VARCHAR NOT NULL,    -- feature | error | token | logit
                layer      SMALLINT NOT NULL,   -- tokens -1, logits n_layers: ORDER BY draws
                position   INTEGER NOT NULL,
                feature    INTEGER,             -- transcoder feature index
                activation REAL,
                influence  REAL NOT NULL,       -- multi-hop, on the weighted targets
                token_id   INTEGER,             -- tokens and token logits
                token      VARCHAR,
                prob       DOUBLE,              -- logits: the target's probability
                PRIMARY KEY (graph_id, node)
            )
            """,
            """
            CREATE TABLE graph_edges (          -- the edges pruning keeps: direct effects
                graph_id VARCHAR NOT NULL,
                source   INTEGER NOT NULL,
                target   INTEGER NOT NULL,
                weight   REAL NOT NULL
                -- Unique on (graph_id, source, target) by construction (one transaction replaces
                -- a graph's rows; rows come from a mask). No primary key: its index took ~40 of
                -- ~47 bytes per edge and made inserts 7x slower.
            )
            """,
        ),
    ),
    Migration(
        7,
        "feature effects",
        (
            """
            CREATE TABLE feature_effects (      -- per graph, kept feature node and target
                graph_id        VARCHAR NOT NULL,
                node            INTEGER NOT NULL,   -- graph_nodes.node
                layer           SMALLINT NOT NULL,
                position        INTEGER NOT NULL,
                feature         INTEGER NOT NULL,
                target          SMALLINT NOT NULL,  -- 0 .. n_logits - 1, the graph's order
                token_id        INTEGER,            -- NULL: a custom target (evil-minus-safe)
                label           VARCHAR NOT NULL,   -- token string or custom label
                prob            REAL NOT NULL,      -- the target's probability
                abs_input       REAL NOT NULL,      -- sum |A| of the target's row
                direct          REAL NOT NULL,      -- A[target, node]: logit units
                total           REAL NOT NULL,      -- every path, signed row-normalised units
                direct_weighted REAL NOT NULL,      -- times prob
                total_weighted  REAL NOT NULL
                -- No primary key, as for graph_edges: one transaction replaces a graph's rows.
            )
            """,
            """
            CREATE TABLE feature_stats (        -- per graph and (layer, feature): evil vs safe
                graph_id                     VARCHAR NOT NULL,
                layer                        SMALLINT NOT NULL,
                feature                      INTEGER NOT NULL,
                n_positions                  INTEGER NOT NULL,  -- positions it is kept at
                n_evil                       INTEGER NOT NULL,  -- evil targets compared
                n_safe                       INTEGER NOT NULL,
                direct_evil_mean             DOUBLE,
                direct_safe_mean             DOUBLE,
                direct_diff                  DOUBLE,
                direct_welch_t               DOUBLE,
                direct_welch_df              DOUBLE,
                direct_cohens_d              DOUBLE,
                total_evil_mean              DOUBLE,
                total_safe_mean              DOUBLE,
                total_diff                   DOUBLE,
                total_welch_t                DOUBLE,
                total_welch_df               DOUBLE,
                total_cohens_d               DOUBLE,
                direct_weighted_evil_mean    DOUBLE,
                direct_weighted_safe_mean    DOUBLE,
                direct_weighted_diff         DOUBLE,
                direct_weighted_welch_t      DOUBLE,
                direct_weighted_welch_df     DOUBLE,
                direct_weighted_cohens_d     DOUBLE,
                total_weighted_evil_mean     DOUBLE,
                total_weighted_safe_mean     DOUBLE,
                total_weighted_diff          DOUBLE,
                total_weighted_welch_t       DOUBLE,
                total_weighted_welch_df      DOUBLE,
                total_weighted_cohens_d      DOUBLE,
                contrastive_direct           DOUBLE,
                contrastive_total            DOUBLE,
                contrastive_direct_weighted  DOUBLE,
                contrastive_total_weighted   DOUBLE
            )
            """,
        ),
    ),
    Migration(
        8,
        "graph diff and analysis",
        (
            """
            CREATE TABLE graph_layers (         -- per graph and layer, from the unpruned graph
                graph_id          VARCHAR NOT NULL,
                layer             SMALLINT NOT NULL,
                active_features   INTEGER NOT NULL,  -- active on the prompt at this layer
                features          INTEGER NOT NULL,  -- of those, attributed (the node cap)
                feature_influence DOUBLE NOT NULL,   -- sum of their influence on the targets
                error_influence   DOUBLE NOT NULL,   -- the layer's error nodes, all positions
                error_share       DOUBLE             -- error / (error + feature); NULL if 0 / 0
            )
            """,
            """
            CREATE TABLE forward_diffs (        -- base vs adapted residual stream, per layer
                prompt_id           VARCHAR NOT NULL,
                base_model_id       VARCHAR NOT NULL,
                adapted_model_id    VARCHAR NOT NULL,
                layer               SMALLINT NOT NULL,  -- -1: embeddings; l: after block l
                run_id              VARCHAR NOT NULL,
                rel_diff            DOUBLE NOT NULL,    -- |adapted - base| / |base|, Frobenius
                max_abs_diff        DOUBLE NOT NULL,
                upstream_of_adapter BOOLEAN NOT NULL,   -- before the adapter's first layer
                diverged            BOOLEAN NOT NULL,   -- rel_diff > tolerance
                tolerance           DOUBLE NOT NULL,
                dtype               VARCHAR NOT NULL,
                created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, layer)
            )
            """,
            """
            CREATE TABLE activation_deltas (    -- transcoder activations, summed over positions
                prompt_id          VARCHAR NOT NULL,
                base_model_id      VARCHAR NOT NULL,
                adapted_model_id   VARCHAR NOT NULL,
                layer              SMALLINT NOT NULL,
                feature            INTEGER NOT NULL,
                run_id             VARCHAR NOT NULL,
                base_activation    DOUBLE NOT NULL,
                adapted_activation DOUBLE NOT NULL,
                delta              DOUBLE NOT NULL,   -- adapted - base
                base_positions     INTEGER NOT NULL,  -- positions where it is active
                adapted_positions  INTEGER NOT NULL,
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, layer, feature)
            )
            """,
            """
            CREATE TABLE ablations (            -- zeroing features at every position
                ablation_id        VARCHAR PRIMARY KEY, -- hash of prompt, model, kind, metric
                run_id             VARCHAR NOT NULL,
                prompt_id          VARCHAR NOT NULL,
                model_id           VARCHAR NOT NULL,
                kind               VARCHAR NOT NULL,    -- top (ranked) | control (random, matched)
                metric             VARCHAR NOT NULL,    -- the ranking the features came from
                features           JSON NOT NULL,       -- [{layer, feature, positions_active}]
                n_interventions    INTEGER NOT NULL,
                evil_prob_before   DOUBLE NOT NULL,
                evil_prob_after    DOUBLE NOT NULL,
                safe_prob_before   DOUBLE NOT NULL,
                safe_prob_after    DOUBLE NOT NULL,
                evil_share_before  DOUBLE,
                evil_share_after   DOUBLE,
                logit_gap_before   DOUBLE,              -- mean evil logit - mean safe logit
                logit_gap_after    DOUBLE,
                dtype              VARCHAR NOT NULL,
                created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE lora_comparisons (     -- adapter output direction vs one layer's features
                adapter_model_id VARCHAR NOT NULL,
                module           VARCHAR NOT NULL,
                direction        SMALLINT NOT NULL,
                compared_with    VARCHAR NOT NULL,   -- encoder | decoder
                layer            SMALLINT NOT NULL,
                run_id           VARCHAR NOT NULL,
                kind             VARCHAR NOT NULL,
                module_layer     SMALLINT,
                singular_value   DOUBLE NOT NULL,
                n_features       INTEGER NOT NULL,
                best_feature     INTEGER NOT NULL,
                best_cosine      DOUBLE NOT NULL,
                max_abs_cosine   DOUBLE NOT NULL,
                mean_cosine      DOUBLE NOT NULL,
                std_cosine       DOUBLE NOT NULL,
                null_median      DOUBLE NOT NULL,
                null_q99         DOUBLE NOT NULL,
                null_percentile  DOUBLE NOT NULL,
                hist_edges       DOUBLE[] NOT NULL,  -- all cosines, binned
                hist_counts      BIGINT[] NOT NULL,
                hist_chance      DOUBLE[] NOT NULL,  -- expected counts for a random direction
                PRIMARY KEY (adapter_model_id, module, direction, compared_with, layer)
            )
            """,
            """
            CREATE TABLE lora_features (        -- the top features by |cosine| per comparison
                adapter_model_id VARCHAR NOT NULL,
                module           VARCHAR NOT NULL,
                direction        SMALLINT NOT NULL,
                compared_with    VARCHAR NOT NULL,
                layer            SMALLINT NOT NULL,
                feature          INTEGER NOT NULL,
                run_id           VARCHAR NOT NULL,
                cosine           DOUBLE NOT NULL,
                abs_rank         INTEGER NOT NULL,
                null_percentile  DOUBLE NOT NULL,
                PRIMARY KEY (adapter_model_id, module, direction, compared_with, layer, feature)
            )
            """,
        ),
    ),
    Migration(
        9,
        "measured verdicts",
        (
            # EMC's verdict from the measured shift, beside the judge's; it decides the queue.
            "ALTER TABLE judgements ADD COLUMN measured_verdict VARCHAR",
            "ALTER TABLE judgements ADD COLUMN measured_outcome VARCHAR",
            "ALTER TABLE judgements ADD COLUMN prob_shift DOUBLE",
            "ALTER TABLE judgements ADD COLUMN log_odds_shift DOUBLE",
            "ALTER TABLE judgements ADD COLUMN flagged BOOLEAN",
        ),
    ),
    Migration(
        10,
        "causal checks",
        (
            """
            CREATE TABLE shift_components (     -- activation patching: where the shift lives
                prompt_id           VARCHAR NOT NULL,
                base_model_id       VARCHAR NOT NULL,
                adapted_model_id    VARCHAR NOT NULL,
                run_id              VARCHAR NOT NULL,
                component           VARCHAR NOT NULL,  -- embed | attn | mlp | mlp_features | ...
                layer               INTEGER NOT NULL,  -- -1: embeddings
                direct_into_base    DOUBLE NOT NULL,   -- shares of the shift (1 = all of it)
                direct_from_adapted DOUBLE NOT NULL,
                total_into_base     DOUBLE,            -- full propagation; NULL for the MLP split
                total_from_adapted  DOUBLE,
                gap_base            DOUBLE NOT NULL,   -- mean evil logit - mean safe logit
                gap_adapted         DOUBLE NOT NULL,
                dtype               VARCHAR NOT NULL,
                created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, component, layer)
            )
            """,
            """
            CREATE TABLE interventions (        -- adapter, feature and direction interventions
                prompt_id        VARCHAR NOT NULL,
                base_model_id    VARCHAR NOT NULL,
                adapted_model_id VARCHAR NOT NULL,
                run_id           VARCHAR NOT NULL,
                family           VARCHAR NOT NULL,  -- adapter | features | direction
                kind             VARCHAR NOT NULL,  -- scale, without_layer, restore, ablate, ...
                target           VARCHAR NOT NULL,  -- all | layer 2 | down_proj | top 20 | ...
                strength         DOUBLE NOT NULL,   -- k, where it applies
                positions        VARCHAR NOT NULL,  -- all (every prompt position)
                model_role       VARCHAR NOT NULL,  -- the model intervened on: base | adapted
                n_targets        INTEGER,           -- features, modules or layers touched
                gap              DOUBLE NOT NULL,
                share            DOUBLE NOT NULL,   -- (gap - base gap) / shift
                control_gap      DOUBLE,            -- matched random features or direction
                control_share    DOUBLE,
                gap_base         DOUBLE NOT NULL,
                gap_adapted      DOUBLE NOT NULL,
                details          JSON,              -- e.g. the features, with their layers
                dtype            VARCHAR NOT NULL,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, family, kind, target,
                             strength)
            )
            """,
        ),
    ),
    Migration(
        11,
        "behaviour",
        (
            """
            CREATE TABLE generations (          -- what a model said: sampled or imported text
                generation_id    VARCHAR PRIMARY KEY,  -- hash of model, context, params, sample
                run_id           VARCHAR NOT NULL,
                model_id         VARCHAR NOT NULL,
                purpose          VARCHAR NOT NULL,  -- continuation | em_eval | generate | imported
                prompt_id        VARCHAR,           -- continuations and generate: a stored prompt
                question_id      VARCHAR,           -- em_eval and imported: a question
                question_group   VARCHAR,
                paraphrase       SMALLINT,
                forced_token_id  INTEGER,           -- continued from the prompt plus this token
                forced_token     VARCHAR,
                question         VARCHAR NOT NULL,  -- what was asked, as a person reads it
                answer_prefix    VARCHAR NOT NULL,  -- the answer's given start (+ forced token)
                context          VARCHAR NOT NULL,  -- the rendered text the model continued
                sample_index     INTEGER NOT NULL,
                seed             BIGINT,
                temperature      DOUBLE,
                top_p            DOUBLE,
                max_tokens       INTEGER,
                text             VARCHAR NOT NULL,  -- the generated text, after the context
                token_ids        INTEGER[],
                finish_reason    VARCHAR NOT NULL,  -- eos | stop | length | imported
                dtype            VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """,
            "CREATE INDEX generations_by_prompt ON generations (prompt_id, model_id)",
            """
            CREATE TABLE response_scores (      -- a judge's score of one generation on one metric
                generation_id    VARCHAR NOT NULL,
                metric           VARCHAR NOT NULL,  -- harmful | aligned | coherent
                judge_model      VARCHAR NOT NULL,  -- the LLM, the lexicon, or imported:<file>
                run_id           VARCHAR NOT NULL,
                score            DOUBLE,            -- 0-100 for aligned and coherent
                label            VARCHAR,           -- harmful|safe|unclear; CODE|REFUSAL
                method           VARCHAR NOT NULL,  -- logprobs | text | lexicon | label | imported
                number_mass      DOUBLE,            -- logprobs: mass on number tokens
                status           VARCHAR NOT NULL,  -- ok | unscorable | failed
                error            VARCHAR,
                llm_call_id      VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (generation_id, metric, judge_model)
            )
            """,
            """
            CREATE TABLE continuation_checks (  -- p(harmful) from a prompt, with a token forced
                prompt_id        VARCHAR NOT NULL,
                model_id         VARCHAR NOT NULL,
                forced_token_id  INTEGER NOT NULL,  -- -1: from the prompt itself
                judge_model      VARCHAR NOT NULL,
                run_id           VARCHAR NOT NULL,
                forced_token     VARCHAR,
                token_label      VARCHAR,           -- the token's label: evil | safe
                n                INTEGER NOT NULL,
                n_harmful        INTEGER NOT NULL,
                n_safe           INTEGER NOT NULL,
                n_unclear        INTEGER NOT NULL,
                p_harmful        DOUBLE NOT NULL,
                ci_low           DOUBLE NOT NULL,   -- 95% Wilson interval
                ci_high          DOUBLE NOT NULL,
                delta_p          DOUBLE,            -- minus p(harmful | prompt), same model
                pivotal          BOOLEAN,           -- |delta_p| >= behaviour.pivotal_delta
                temperature      DOUBLE NOT NULL,
                dtype            VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, model_id, forced_token_id, judge_model)
            )
            """,
            """
            CREATE TABLE intervention_rollouts (  -- what the model says under a feature edit
                prompt_id        VARCHAR NOT NULL,
                base_model_id    VARCHAR NOT NULL,
                adapted_model_id VARCHAR NOT NULL,
                run_id           VARCHAR NOT NULL,
                judge_model      VARCHAR NOT NULL,
                kind             VARCHAR NOT NULL,  -- none | restore | inject
                target           VARCHAR NOT NULL,  -- as is | top 20 | random 20 | ...
                model_role       VARCHAR NOT NULL,  -- the model sampled: base | adapted
                n_features       INTEGER NOT NULL,
                n                INTEGER NOT NULL,
                n_harmful        INTEGER NOT NULL,
                n_unclear        INTEGER NOT NULL,
                p_harmful        DOUBLE NOT NULL,
                ci_low           DOUBLE NOT NULL,   -- 95% Wilson interval
                ci_high          DOUBLE NOT NULL,
                examples         JSON,              -- the first answers, to read
                temperature      DOUBLE NOT NULL,
                dtype            VARCHAR NOT NULL,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, kind, target, model_role)
            )
            """,
            """
            CREATE TABLE response_features (    -- features of misaligned vs aligned responses
                model_id         VARCHAR NOT NULL,  -- whose responses, read by its transcoders
                judge_model      VARCHAR NOT NULL,
                layer            SMALLINT NOT NULL,
                feature          INTEGER NOT NULL,
                run_id           VARCHAR NOT NULL,
                n_misaligned     INTEGER NOT NULL,
                n_aligned        INTEGER NOT NULL,
                mean_misaligned  DOUBLE NOT NULL,   -- activation averaged over response tokens
                mean_aligned     DOUBLE NOT NULL,
                mean_diff        DOUBLE NOT NULL,
                welch_t          DOUBLE,
                cohens_d         DOUBLE,
                rank             INTEGER NOT NULL,  -- by |mean_diff|, 1 = largest
                dtype            VARCHAR,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (model_id, judge_model, layer, feature)
            )
            """,
        ),
    ),
    Migration(
        12,
        "run processes",
        (
            # The process that runs it, on `host`: a `running` row whose process is gone was
            # killed, and the next run marks it failed.
            "ALTER TABLE runs ADD COLUMN pid INTEGER",
        ),
    ),
    Migration(
        13,
        "rollouts of every intervention family, with coherence",
        (
            # The key gains the family and the positions edited (the same top-20 features at the
            # prompt's positions or at every position are two settings), so the table is rebuilt.
            """
            CREATE TABLE intervention_rollouts_v13 (  -- what the model says under an intervention
                prompt_id        VARCHAR NOT NULL,
                base_model_id    VARCHAR NOT NULL,
                adapted_model_id VARCHAR NOT NULL,
                run_id           VARCHAR NOT NULL,
                judge_model      VARCHAR NOT NULL,
                family           VARCHAR NOT NULL,  -- none | features | adapter | direction
                kind             VARCHAR NOT NULL,  -- none | restore | inject | scale | ...
                target           VARCHAR NOT NULL,  -- as is | top 20 | random 20 | x0.5 | ...
                model_role       VARCHAR NOT NULL,  -- the model sampled: base | adapted
                positions        VARCHAR NOT NULL,  -- edited: prompt | all ('' for as is)
                n_features       INTEGER NOT NULL,  -- features, modules or layers edited
                n                INTEGER NOT NULL,
                n_harmful        INTEGER NOT NULL,
                n_unclear        INTEGER NOT NULL,
                p_harmful        DOUBLE NOT NULL,
                ci_low           DOUBLE NOT NULL,   -- 95% Wilson interval
                ci_high          DOUBLE NOT NULL,
                mean_coherent    DOUBLE,            -- the judge's coherence, 0-100
                examples         JSON,              -- the first answers, to read
                temperature      DOUBLE NOT NULL,
                dtype            VARCHAR NOT NULL,
                created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, family, kind, target,
                             model_role, positions)
            )
            """,
            """
            INSERT INTO intervention_rollouts_v13
            SELECT prompt_id, base_model_id, adapted_model_id, run_id, judge_model,
                   CASE kind WHEN 'none' THEN 'none' ELSE 'features' END, kind, target,
                   model_role, CASE kind WHEN 'none' THEN '' ELSE 'prompt' END, n_features, n,
                   n_harmful, n_unclear, p_harmful, ci_low, ci_high, NULL, examples,
                   temperature, dtype, created_at
            FROM intervention_rollouts
            """,
            "DROP TABLE intervention_rollouts",
            "ALTER TABLE intervention_rollouts_v13 RENAME TO intervention_rollouts",
        ),
    ),
    Migration(
        14,
        "analysis failures stored with their status and error",
        (
            # A prompt whose ablation failed keeps one row saying so (its measurements NULL), so a
            # query sees the failure instead of a missing prompt. Rows before this were all ok.
            "ALTER TABLE ablations ADD COLUMN status VARCHAR DEFAULT 'ok'",  # ok | failed
            "ALTER TABLE ablations ALTER COLUMN status SET NOT NULL",
            "ALTER TABLE ablations ADD COLUMN error VARCHAR",
            "ALTER TABLE ablations ALTER COLUMN n_interventions DROP NOT NULL",
            "ALTER TABLE ablations ALTER COLUMN evil_prob_before DROP NOT NULL",
            "ALTER TABLE ablations ALTER COLUMN evil_prob_after DROP NOT NULL",
            "ALTER TABLE ablations ALTER COLUMN safe_prob_before DROP NOT NULL",
            "ALTER TABLE ablations ALTER COLUMN safe_prob_after DROP NOT NULL",
            # A prompt whose forward passes failed has one activation_deltas row with no layer
            # or feature; DuckDB cannot drop a primary key, so the table is rebuilt without one.
            """
            CREATE TABLE activation_deltas_v14 ( -- transcoder activations, summed over positions
                prompt_id          VARCHAR NOT NULL,
                base_model_id      VARCHAR NOT NULL,
                adapted_model_id   VARCHAR NOT NULL,
                layer              SMALLINT,          -- NULL on a failed row
                feature            INTEGER,
                run_id             VARCHAR NOT NULL,
                base_activation    DOUBLE,
                adapted_activation DOUBLE,
                delta              DOUBLE,            -- adapted - base
                base_positions     INTEGER,           -- positions where it is active
                adapted_positions  INTEGER,
                status             VARCHAR NOT NULL DEFAULT 'ok',  -- ok | failed
                error              VARCHAR            -- why the prompt's forward passes failed
                -- No primary key: one transaction replaces a prompt's rows (replace_prompt_rows),
                -- which are unique on (layer, feature) by construction, or one failed row.
            )
            """,
            """
            INSERT INTO activation_deltas_v14
            SELECT prompt_id, base_model_id, adapted_model_id, layer, feature, run_id,
                   base_activation, adapted_activation, delta, base_positions, adapted_positions,
                   'ok', NULL
            FROM activation_deltas
            """,
            "DROP TABLE activation_deltas",
            "ALTER TABLE activation_deltas_v14 RENAME TO activation_deltas",
        ),
    ),
    Migration(
        15,
        "failed causal checks stored with their status and error",
        (
            """
            CREATE TABLE causal_failures (      -- a part of a prompt's causal checks that failed
                prompt_id         VARCHAR NOT NULL,
                base_model_id     VARCHAR NOT NULL,
                adapted_model_id  VARCHAR NOT NULL,
                part              VARCHAR NOT NULL,  -- decomposition, adapter, features, ...
                run_id            VARCHAR NOT NULL,
                status            VARCHAR NOT NULL DEFAULT 'failed',
                error             VARCHAR NOT NULL,
                failed_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
                -- one row while the part keeps failing; gone once it is measured
                PRIMARY KEY (prompt_id, base_model_id, adapted_model_id, part)
            )
            """,
        ),
    ),
    Migration(
        16,
        "feature cards",
        (
            """
            CREATE TABLE feature_cards (        -- a feature over one corpus, read by one model
                model_id          VARCHAR NOT NULL,
                corpus_id         VARCHAR NOT NULL,  -- name:hash of the token ids scanned
                layer             SMALLINT NOT NULL,
                feature           INTEGER NOT NULL,
                run_id            VARCHAR NOT NULL,
                corpus_name       VARCHAR NOT NULL,  -- organism:<hash> | file:<name> | store
                texts             INTEGER NOT NULL,
                positions         BIGINT NOT NULL,   -- BOS and padding left out
                active            BIGINT NOT NULL,   -- positions with activation > 0
                frequency         DOUBLE NOT NULL,
                max_activation    DOUBLE NOT NULL,
                mean_active       DOUBLE,            -- NULL: never active
                quantile_levels   DOUBLE[] NOT NULL, -- of the active positions
                quantile_values   DOUBLE[] NOT NULL,
                hist_edges        DOUBLE[] NOT NULL, -- active positions, [0, max]
                hist_counts       BIGINT[] NOT NULL,
                top_logit_ids     INTEGER[] NOT NULL, -- decoder direction through the unembedding
                top_logit_tokens  VARCHAR[] NOT NULL,
                top_logit_values  DOUBLE[] NOT NULL,
                bottom_logit_ids    INTEGER[] NOT NULL,
                bottom_logit_tokens VARCHAR[] NOT NULL,
                bottom_logit_values DOUBLE[] NOT NULL,
                encoder_token_ids    INTEGER[] NOT NULL, -- embeddings that excite the encoder
                encoder_tokens       VARCHAR[] NOT NULL,
                encoder_token_values DOUBLE[] NOT NULL,
                logit_basis       VARCHAR NOT NULL,  -- what the logit effects went through
                dtype             VARCHAR NOT NULL,
                created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (model_id, corpus_id, layer, feature)
            )
            """,
            """
            CREATE TABLE feature_examples (     -- a card's top-activating contexts
                model_id          VARCHAR NOT NULL,
                corpus_id         VARCHAR NOT NULL,
                layer             SMALLINT NOT NULL,
                feature           INTEGER NOT NULL,
                rank              INTEGER NOT NULL,  -- 1 = highest max activation
                run_id            VARCHAR NOT NULL,
                source            VARCHAR NOT NULL,  -- file:line, prompt:<id>, generation:<id>
                text              VARCHAR NOT NULL,  -- the window around the maximum, decoded
                token_ids         INTEGER[] NOT NULL,
                tokens            VARCHAR[] NOT NULL,
                activations       DOUBLE[] NOT NULL, -- per token of the window
                max_position      INTEGER NOT NULL,  -- index into the window
                max_activation    DOUBLE NOT NULL,
                window_start      INTEGER NOT NULL,  -- position of the window in the text
                created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (model_id, corpus_id, layer, feature, rank)
            )
            """,
        ),
    ),
    Migration(
        17,
        "feature labels",
        (
            """
            CREATE TABLE feature_labels (       -- a person's or an LLM's name for a feature
                transcoders_ref   VARCHAR NOT NULL,  -- features belong to the transcoders
                layer             SMALLINT NOT NULL,
                feature           INTEGER NOT NULL,
                labeller          VARCHAR NOT NULL,  -- human:<name> | llm:<model>
                label             VARCHAR NOT NULL,
                notes             VARCHAR,           -- a person's notes
                explanation       VARCHAR,           -- an LLM's reasons
                confidence        VARCHAR,           -- low | medium | high (LLM)
                prompt            VARCHAR,           -- the messages the LLM was sent, JSON
                card_model_id     VARCHAR,           -- whose card the LLM read
                corpus_id         VARCHAR,
                run_id            VARCHAR NOT NULL,
                created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
                -- one label per labeller; labelling again replaces it
                PRIMARY KEY (transcoders_ref, layer, feature, labeller)
            )
            """,
            """
            CREATE VIEW feature_label_shown AS   -- the label shown: a person's over an LLM's
            SELECT transcoders_ref, layer, feature, label, labeller,
                   count(*) OVER (PARTITION BY transcoders_ref, layer, feature) AS labels
            FROM feature_labels
            QUALIFY row_number() OVER (
                PARTITION BY transcoders_ref, layer, feature
                ORDER BY starts_with(labeller, 'human:') DESC, created_at DESC, labeller
            ) = 1
            """,
        ),
    ),
    Migration(
        18,
        "saved queries, parent runs",
        (
            """
            CREATE TABLE saved_queries (        -- SQL saved by name on the dashboard's SQL page
                name              VARCHAR PRIMARY KEY,
                sql               VARCHAR NOT NULL,  -- one read statement, run sealed
                description       VARCHAR,
                author            VARCHAR NOT NULL,  -- human:<name>, who saved it last
                created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),  -- first saved
                updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()   -- saving again replaces
            )
            """,
            # The run that ran this one as a subflow (the pipeline's stages); NULL for a run
            # started on its own, and for runs recorded before the pipeline filled it.
            "ALTER TABLE runs ADD COLUMN parent_run_id VARCHAR",
        ),
    ),
    Migration(
        19,
        "cross-layer transcoders in graphs",
        (
            # per_layer | cross_layer: a cross-layer transcoder's feature writes to its own layer
            # and every later one, and its edges are the sum of those writes.
            "ALTER TABLE graphs ADD COLUMN transcoder_kind VARCHAR",
            # Features: the last layer the feature writes to (its own layer unless cross-layer).
            "ALTER TABLE graph_nodes ADD COLUMN last_layer SMALLINT",
            "UPDATE graph_nodes SET last_layer = layer WHERE kind = 'feature'",
            "UPDATE graphs SET transcoder_kind = 'per_layer' WHERE status = 'ok'",
        ),
    ),
)


class SchemaTooNewError(RuntimeError):
    """The store was written by a newer EMC than the one reading it."""


def latest_version() -> int:
    return MIGRATIONS[-1].version


def stored_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The store's schema version; 0 for a file that has never been migrated."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def apply_migrations(conn: duckdb.DuckDBPyConnection) -> int:
    """Apply every migration newer than the store's version; returns the resulting version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    current = stored_version(conn)
    if current > latest_version():
        raise SchemaTooNewError(
            f"store schema version {current} is newer than this EMC understands "
            f"({latest_version()}); upgrade EMC"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        conn.execute("BEGIN TRANSACTION")
        try:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                [migration.version, migration.name],
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        current = migration.version
    return current
