"""Explanations for Kim's CNN, from the exported graph's evidence outputs (no torch).

A width-m filter is an m-gram detector and max-over-time keeps its best window, so each pooled
feature j names one window (its start) and adds contributions[c, j] = feature_j * W[c, j] to
class c's logit. For the predicted class we group the features by the window they picked
(several filters often pick the same n-gram), sum their contributions, and report the windows
that added most. logit = bias + sum of all contributions, exactly; `rest` is the part of that
sum outside the listed n-grams. An ensemble (models/ensemble.py) serves the mean of its members'
logits: its graph lists every member's features, each contribution divided by the number of
members, so the same sum holds and `filters` counts the members' filters together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from models.text_encoding import tokenize
from services.backends.inference import BundleError, TextClassifier


def explain_texts(classifier: TextClassifier, texts: Sequence[str], top_k: int) -> list[dict]:
    token_ids, lengths, logits, window_starts, contributions = classifier.evidence(texts)
    model = classifier.bundle.config["model"]
    members = classifier.bundle.config.get("ensemble", {}).get("members", 1)  # an ensemble: its members side by side
    widths = [w for _ in range(members) for w in model["filter_widths"] for _ in range(model["feature_maps"])]  # feature j's
    if window_starts.shape[1] != len(widths):
        raise BundleError(f"{classifier.bundle.name}: its graph has {window_starts.shape[1]} evidence features; config.json "
                          f"describes {len(widths)} ({members} x {len(model['filter_widths'])} widths x {model['feature_maps']} maps)")
    encoder = classifier.encoder
    results = []
    for row, text in enumerate(texts):
        words = tokenize(text, lowercase=encoder.lowercase)
        predicted = int(logits[row].argmax())
        by_window: dict[tuple[int, int], list[float]] = defaultdict(list)
        for feature, (start, width) in enumerate(zip(window_starts[row].tolist(), widths)):
            share = float(contributions[row, predicted, feature])
            if share != 0.0:
                by_window[(start - encoder.edge_padding, width)].append(share)
        ranked = sorted(by_window.items(), key=lambda item: -sum(item[1]))
        listed = []
        for (first, width), shares in ranked[:top_k]:
            # The window may reach into Kim's edge padding: list the real words it covers.
            covered = [words[i] for i in range(max(first, 0), min(first + width, len(words)))]
            listed.append({
                "ngram": " ".join(covered) if covered else "<padding>",  # a window wholly in the edge padding
                "start": max(first, 0),
                "width": width,
                "contribution": sum(shares),
                "filters": len(shares),
            })
        total = float(contributions[row, predicted].sum())
        results.append({
            "label": classifier.labels[predicted],
            "logit": float(logits[row, predicted]),
            "bias": float(logits[row, predicted]) - total,
            "ngrams": listed,
            "rest": total - sum(entry["contribution"] for entry in listed),
        })
    return results
