"""Admission: the per-worker count of texts in flight (the refusal before the body is read is
tests/test_pipeline.py's)."""

import pytest

from services.http.admission import Admission
from services.errors import ApiError


def test_reserve_counts_cost_up_to_the_limit_and_refuses_past_it():
    admission = Admission(limit=10)
    admission.reserve(6)
    admission.reserve(4)  # exactly the limit is admitted
    assert admission.pending == 10 and admission.full
    with pytest.raises(ApiError) as refused:
        admission.reserve(1)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    assert "10 texts" in refused.value.message and "TEXTSERVE_MAX_PENDING_TEXTS" in refused.value.message
    assert admission.pending == 10  # a refusal counts nothing
    admission.release(7)
    assert admission.pending == 3 and not admission.full
    admission.reserve(7)


def test_a_request_larger_than_the_limit_is_413_not_429():
    admission = Admission(limit=10)
    with pytest.raises(ApiError) as refused:
        admission.reserve(11)
    assert refused.value.status == 413 and "send fewer" in refused.value.message
    assert admission.pending == 0
