"""The JSON API's response building, without a server."""

import numpy as np

from services.api.http_api import top_k_results


def test_top_k_results_orders_labels_and_keeps_label_order_on_ties():
    labels = ("a", "b", "c")
    probabilities = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]], dtype=np.float32)
    first, tied = top_k_results(labels, probabilities, 2)
    assert first["label"] == "b" and [e["label"] for e in first["top_k"]] == ["b", "c"]
    assert first["probabilities"] == {"a": float(np.float32(0.2)), "b": float(np.float32(0.5)), "c": float(np.float32(0.3))}
    assert tied["label"] == "a" and [e["label"] for e in tied["top_k"]] == ["a", "c"]  # a before c, as argsort(stable)
