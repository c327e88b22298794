"""Stages: each takes its own config section and paths, and writes one table (Parquet
parts, columns from `schema.py`). They never see the whole job file; the jobs in
`baez_ray/jobs/` decide their order, resume and report names.

    collect   contexts/ ─▶ features/          (base model + SAE actors, merge)
    logit_lens features/ ─▶ features/         (pos/neg tokens: each decoder row through the unembedding)
    ingest    Neuronpedia export ─▶ features/ (+ rejects/)
    route     features/ ─▶ routes/            (embedder actors: C_in, C_out, C_cross, tier)
    split     features/ ─▶ train/, test/      (disjoint examples; held-out samples of a label run)
    label     routes/ + features/ ─▶ label_shards/ ─▶ labels/   (one method per tier; resumable)
    negatives corpus ─▶ examples where a feature does not fire
    score     labels + test examples ─▶ scores/   (logit_embedding: + the features' promoted tokens)
"""
