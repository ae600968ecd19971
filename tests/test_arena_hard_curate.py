"""Topic clusters (UMAP → HDBSCAN → c-TF-IDF), cluster selection and the v0.1 question file of `curate`."""

from __future__ import annotations

import numpy as np

from lmstack.evals.arena_hard.cluster import TopicConfig, TopicModel, ctfidf_keywords
from lmstack.evals.arena_hard.curate import CurateConfig, select, summarize_clusters

TOPICS = {
    "python": "python function list sorting code",
    "cooking": "recipe dinner pasta sauce cooking",
    "travel": "trip hotel flight itinerary travel",
}


def test_ctfidf_ranks_words_distinct_to_a_cluster() -> None:
    docs = ["python code function", "python list code", "pasta recipe sauce", "recipe dinner pasta", "the code"]
    labels = np.array([0, 0, 1, 1, -1])
    keywords = ctfidf_keywords(docs, labels, 2)
    assert set(keywords) == {0, 1}
    assert set(keywords[0]) == {"python", "code"}
    assert set(keywords[1]) <= {"pasta", "recipe", "sauce", "dinner"} and len(keywords[1]) == 2


def test_topic_model_finds_planted_clusters() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 384))
    emb = np.concatenate([c + 0.15 * rng.normal(size=(60, 384)) for c in centers])  # [180, 384]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    docs = [f"{TOPICS[t]} example {i}" for t in TOPICS for i in range(60)]
    model = TopicModel(TopicConfig(min_cluster_size=20, seed=0)).fit(emb, docs)
    truth = np.repeat([0, 1, 2], 60)
    assert len(set(model.labels_.tolist()) - {-1}) == 3
    for t in range(3):  # every planted group lands (almost) entirely in one cluster
        labels, counts = np.unique(model.labels_[truth == t], return_counts=True)
        assert counts.max() >= 55 and labels[counts.argmax()] != -1
    assert {kw[0] for kw in model.keywords_.values()} <= {w for v in TOPICS.values() for w in v.split()}


def test_selection_takes_best_clusters_and_best_prompts() -> None:
    records, labels = [], []
    for c, scores in enumerate([[1, 2, 1], [6, 7, 5, None], [4, 4, 3]]):
        for i, s in enumerate(scores):
            records.append({"id": f"c{c}p{i}", "prompt": f"prompt {c}-{i}", "score": s})
            labels.append(c)
    labels_arr = np.array(labels)
    clusters = summarize_clusters(labels_arr, records, {0: ["a"], 1: ["b"], 2: ["c"]})
    for c in clusters:
        c["name"] = f"topic {c['cluster']}"
    assert [c["annotated"] for c in clusters] == [3, 3, 3]
    questions = select(clusters, records, labels_arr, CurateConfig(num_clusters=2, per_cluster=2))
    assert [q.cluster for q in questions] == ["topic 1", "topic 1", "topic 2", "topic 2"]
    assert {q.question_id for q in questions[:2]} == {"c1p0", "c1p1"}
    assert questions[0].to_v01()["turns"] == [{"content": questions[0].prompt}]
    assert [bool(c.get("selected")) for c in clusters] == [False, True, True]
