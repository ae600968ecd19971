"""BenchBuilder + Arena-Hard-Auto (arXiv 2406.11939): curate hard prompts, judge pairwise, score with confidence.

Pipeline: `curate` (LLM quality annotation, topic clusters, selection) → `answer` (answers of each model) →
`judge` (pairwise vs a baseline, position-swapped) → `score` (Bradley-Terry + bootstrap CIs) → `metaeval`
(separability, agreement, Spearman and Brier of a benchmark against a reference ranking).
"""
